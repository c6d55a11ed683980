"""The Hub source through the real huggingface_hub client, against a loopback server that speaks
the Hub's HTTP API (tests/fake_hub.py). The shipped Phi-3 configs are used as they are: the fake
Hub serves their repos at their pinned commits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from conftest import fetch_configured
from fake_hub import FakeHub

from steps.config.schema import FetchArtifact, PipelineConfig
from steps.errors import FetchError
from steps.sources.snapshots import materialize
from steps.store.snapshot_store import SnapshotStore

WEIGHTS_REPO = "microsoft/Phi-3-mini-4k-instruct"
WEIGHTS_COMMIT = "3a811845d89f3c1b3f41b341d0f9f05104769f35"
ONNX_REPO = "microsoft/Phi-3-mini-4k-instruct-onnx"
ONNX_COMMIT = "a484edc37e8f7b425a5aefa25e35905769963681"
GATED_REPO = "org/gated-model"
GATED_COMMIT = "9" * 40
TOKEN = "hf_loopbackSecretToken123"
MiB = 1 << 20
# Over huggingface_hub's 10 MiB read chunk, so a drop after 11 MiB resumes with a Range request.
BIG = os.urandom(12 * MiB)

WEIGHTS = {
    "config.json": b'{"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}',
    "generation_config.json": b'{"eos_token_id": [32000, 32007]}',
    "tokenizer_config.json": b'{"eos_token": "<|endoftext|>", "chat_template": "{{ messages }}"}',
    "model-00001-of-00001.safetensors": BIG,
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "LICENSE": b"MIT",
    "modeling_phi3.py": b"# remote code: not fetched",
    "README.md": b"# card: not fetched",
}
TEMPLATE = {"chat_template.jinja": b"{{ messages }}"}
ONNX = {
    "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/model.onnx": b"cpu onnx graph",
    "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/genai_config.json": b"{}",
    "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/chat_template.jinja": b"{{ messages }}",
    "cuda/cuda-int4-rtn-block-32/model.onnx": b"cuda onnx graph",
    "cuda/cuda-int4-rtn-block-32/chat_template.jinja": b"{{ messages }}",
    "directml/directml-int4-awq-block-128/model.onnx": b"dml onnx graph",
    "directml/directml-int4-awq-block-128/chat_template.jinja": b"{{ messages }}",
}
REPOS = {
    WEIGHTS_REPO: {WEIGHTS_COMMIT: WEIGHTS},
    ONNX_REPO: {ONNX_COMMIT: ONNX},
    GATED_REPO: {GATED_COMMIT: {"config.json": b'{"model_type": "phi3"}', **TEMPLATE}},
}
REFS = {WEIGHTS_REPO: {"main": WEIGHTS_COMMIT}, GATED_REPO: {"main": GATED_COMMIT}}


@pytest.fixture
def hub(loopback_hub) -> FakeHub:
    return loopback_hub(REPOS, REFS, gated={GATED_REPO}, valid_tokens={TOKEN})


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "cache")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pinned_revision_fetches_only_the_allowed_files(hub, store, compose) -> None:
    outcome = fetch_configured(compose("model=phi3-mini-4k"), store)
    files = {entry.path: entry.sha256 for entry in outcome.manifest.files}
    assert set(files) == set(WEIGHTS) - {"modeling_phi3.py", "README.md"}
    assert all(files[path] == _sha(WEIGHTS[path]) for path in files)
    assert outcome.manifest.source["resolved_revision"] == WEIGHTS_COMMIT
    assert outcome.model_dir.name == WEIGHTS_COMMIT  # huggingface_hub's own cache, no copy
    assert outcome.cache == "miss"
    assert outcome.bytes_fetched == sum(len(WEIGHTS[path]) for path in files)
    assert not any(store.root.joinpath("blobs").iterdir())
    assert not any(r.path.endswith(("README.md", "modeling_phi3.py")) for r in hub.requests)


def test_branch_revision_records_the_commit_it_resolved_to(hub, store, compose, caplog) -> None:
    cfg = compose("model=phi3-mini-4k", "model.source.revision=main")
    with caplog.at_level(logging.WARNING):
        outcome = fetch_configured(cfg, store)
    assert outcome.manifest.source["revision"] == "main"
    assert outcome.manifest.source["resolved_revision"] == WEIGHTS_COMMIT
    assert f"resolved to {WEIGHTS_COMMIT}" in caplog.text


def test_prebuilt_onnx_fetches_only_the_compute_targets_subfolder(hub, store, compose) -> None:
    cfg = compose("model=phi3-mini-4k", "compute=cuda", "fetch.artifact=prebuilt_onnx")
    assert cfg.fetch.artifact is FetchArtifact.prebuilt_onnx
    outcome = fetch_configured(cfg, store)
    assert [entry.path for entry in outcome.manifest.files] == [
        "cuda/cuda-int4-rtn-block-32/chat_template.jinja",
        "cuda/cuda-int4-rtn-block-32/model.onnx",
    ]
    assert outcome.model_dir.name == "cuda-int4-rtn-block-32"
    assert (outcome.model_dir / "model.onnx").read_bytes() == b"cuda onnx graph"
    assert outcome.manifest.source["subfolder"] == "cuda/cuda-int4-rtn-block-32"


def test_dropped_connection_mid_file_resumes(hub, store, compose) -> None:
    hub.drop_connection_once(WEIGHTS_REPO, "model-00001-of-00001.safetensors", 11 * MiB)
    outcome = fetch_configured(compose("model=phi3-mini-4k"), store)
    ranged = [r for r in hub.requests if r.method == "GET" and "range" in r.headers]
    assert ranged and ranged[0].path.endswith("model-00001-of-00001.safetensors")
    weights = outcome.model_dir / "model-00001-of-00001.safetensors"
    assert weights.read_bytes() == BIG
    assert not list(Path(os.environ["HF_HUB_CACHE"]).rglob("*.incomplete"))


def test_second_fetch_is_a_hit_and_a_damaged_blob_is_fetched_again(hub, store, compose) -> None:
    cfg = compose("model=phi3-mini-4k")
    first = fetch_configured(cfg, store)
    second = fetch_configured(cfg, store)
    assert (second.cache, second.bytes_fetched) == ("hit", 0)
    weights = first.model_dir / "model-00001-of-00001.safetensors"
    weights.resolve().write_bytes(b"bitrot" + BIG[6:])
    config = first.model_dir / "config.json"
    config.resolve().write_bytes(b'{"tampered": 1}')
    third = fetch_configured(cfg, store)
    assert third.cache == "repaired"
    assert third.bytes_fetched == len(BIG) + len(WEIGHTS["config.json"])
    assert third.manifest.snapshot_id == first.manifest.snapshot_id
    assert weights.read_bytes() == BIG


def test_snapshot_is_materialized_from_a_manifest_in_a_fresh_hf_cache(
    hub, store, compose, tmp_path, monkeypatch
) -> None:
    from huggingface_hub import constants

    cfg = compose("model=phi3-mini-4k", "model.source.revision=main")
    manifest = fetch_configured(cfg, store).manifest
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "another-machine"))
    outcome = materialize(manifest, store)
    assert outcome.cache == "miss"
    assert outcome.manifest.snapshot_id == manifest.snapshot_id
    fetched = [r for r in hub.requests if "/resolve/" in r.path]
    assert all(WEIGHTS_COMMIT in r.path for r in fetched)  # the recorded commit, not "main"


def _gated_cfg(compose) -> PipelineConfig:
    return compose(
        "model=phi3-mini-4k",
        f"model.source.repo_id={GATED_REPO}",
        f"model.source.revision={GATED_COMMIT}",
    )


def test_gated_repo_without_a_token_says_how_to_get_access(hub, store, compose) -> None:
    with pytest.raises(FetchError, match=f"{GATED_REPO} is gated: accept its terms .* HF_TOKEN"):
        fetch_configured(_gated_cfg(compose), store)


def test_gated_repo_with_a_token_is_fetched(hub, store, compose, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    outcome = fetch_configured(_gated_cfg(compose), store)
    assert [entry.path for entry in outcome.manifest.files] == [
        "chat_template.jinja",
        "config.json",
    ]
    assert TOKEN not in outcome.manifest.to_json()
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)


def test_rejected_token_is_reported_as_such(hub, store, compose, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    with pytest.raises(FetchError, match="rejected the token in HF_TOKEN") as raised:
        fetch_configured(compose("model=phi3-mini-4k"), store)
    assert "hf_expired" not in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.source.repo_id=microsoft/no-such-model"], r"was not found on http://127\.0\.0\.1"),
        (["model.source.revision=" + "0" * 40], "has no revision '0000000000"),
        (["model.source.revision=no-such-branch"], "has no revision 'no-such-branch'"),
    ],
)
def test_missing_repo_or_revision_is_a_clear_error(hub, store, compose, overrides, message) -> None:
    with pytest.raises(FetchError, match=message):
        fetch_configured(compose("model=phi3-mini-4k", *overrides), store)


@pytest.mark.slow  # it waits out huggingface_hub's own retries, about 23 s
def test_unreachable_hub_is_a_clear_error(store, compose, tmp_path, monkeypatch) -> None:
    with FakeHub(REPOS, REFS) as hub:
        hub.patch_client(monkeypatch, tmp_path / "hf-home")
    # The server is gone: nothing listens on that port any more (the client retries ~20 s).
    with pytest.raises(FetchError, match=r"cannot reach http://127\.0\.0\.1"):
        fetch_configured(compose("model=phi3-mini-4k"), store)


def _fetch_error(
    loopback_hub, store: SnapshotStore, cfg: PipelineConfig,
    weights: dict[str, bytes] = WEIGHTS, onnx: dict[str, bytes] = ONNX,
) -> str:  # fmt: skip
    """The FetchError's message for `cfg` from a Hub whose pinned commits hold these files."""
    repos = {WEIGHTS_REPO: {WEIGHTS_COMMIT: weights}, ONNX_REPO: {ONNX_COMMIT: onnx}}
    loopback_hub(repos, {WEIGHTS_REPO: {"main": WEIGHTS_COMMIT}})
    with pytest.raises(FetchError) as raised:
        fetch_configured(cfg, store)
    return str(raised.value)


def test_a_tokenizer_without_a_chat_template_fails_the_fetch(store, compose, loopback_hub) -> None:
    plain = WEIGHTS | {"tokenizer_config.json": b'{"eos_token": "<|endoftext|>"}'}
    message = _fetch_error(loopback_hub, store, compose("model=phi3-mini-4k"), weights=plain)
    assert "\n" not in message
    assert f"snapshots/{WEIGHTS_COMMIT}/tokenizer_config.json has no chat_template" in message
    assert "add" in message and "chat_template.jinja" in message


def test_a_prebuilt_folder_missing_at_the_pin_names_the_exports_there(
    store, compose, loopback_hub
) -> None:
    elsewhere = {"cpu_and_mobile/cpu-int4-awq-block-128/genai_config.json": b"{}", **{
        path: data for path, data in ONNX.items() if not path.startswith("cpu_and_mobile/")
    }}  # fmt: skip
    cfg = compose("model=phi3-mini-4k", "fetch.artifact=prebuilt_onnx")
    message = _fetch_error(loopback_hub, store, cfg, onnx=elsewhere)
    assert (
        f"{ONNX_REPO}@{ONNX_COMMIT} has no folder 'cpu_and_mobile/cpu-int4-rtn-block-32" in message
    )
    assert "(its ONNX exports: cpu_and_mobile/cpu-int4-awq-block-128): set" in message
    assert "model.prebuilt_onnx.<compute>.subfolder" in message


def test_a_config_transformers_cannot_read_fails_the_fetch(store, compose, loopback_hub) -> None:
    """Phi-3-mini-128k's first revisions named LongRoPE `su`; transformers 5 no longer reads it."""
    config = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
    }  # fmt: skip
    weights = WEIGHTS | {"config.json": json.dumps(config).encode()}
    message = _fetch_error(loopback_hub, store, compose("model=phi3-mini-4k"), weights=weights)
    assert "\n" not in message
    assert f"snapshots/{WEIGHTS_COMMIT}/config.json cannot be read by transformers" in message
    assert "rope_scaling type 'su'" in message and "pin a model.source.revision" in message
