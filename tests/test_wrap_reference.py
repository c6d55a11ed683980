"""wrap.save_pretrained=false: the transformers model logs a reference to the Hub weights
instead of a copy. Driven end to end against the loopback Hub, which serves the bundled model's
converted files as the phi3-mini-4k repo at its pinned commit."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from fake_hub import FakeHub

from steps import fetch, wrap_transformers
from steps.core.errors import PipelineError
from steps.core.snapshots import FetchOutcome

REPO = "microsoft/Phi-3-mini-4k-instruct"
PINNED = "3a811845d89f3c1b3f41b341d0f9f05104769f35"
NEWER = "4" * 40

pytestmark = pytest.mark.slow


@pytest.fixture
def hub_with_bundled_weights(bundled_fetch: FetchOutcome, tmp_path: Path, monkeypatch):
    files = {
        entry.path: (bundled_fetch.model_dir / entry.path).read_bytes()
        for entry in bundled_fetch.manifest.files
    }
    repos = {REPO: {PINNED: files, NEWER: files}}
    with FakeHub(repos, refs={REPO: {"main": PINNED}}) as hub:
        hub.patch_client(monkeypatch, tmp_path / "hf-home")
        yield hub


def test_reference_mode_logs_no_weights_and_loads_them_from_the_hub(
    hub_with_bundled_weights, compose, tracking_uri, tmp_path
) -> None:
    cfg = compose(
        "model=phi3-mini-4k", "wrap.save_pretrained=false", f"fetch.cache_dir={tmp_path / 'c'}"
    )
    fetch.main(cfg)
    wrap_transformers.main(cfg)
    uri = mlflow.last_active_run().data.tags["model.uri"]
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert not list(local.rglob("*.safetensors")), "reference mode must not copy the weights"
    flavor = mlflow.models.Model.load(str(local)).flavors["transformers"]
    assert flavor["source_model_name"] == REPO
    assert flavor["source_model_revision"] == PINNED
    answer = mlflow.pyfunc.load_model(uri).predict(
        {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 24}
    )
    assert "4" in answer[0]["choices"][0]["message"]["content"]
    downloads = [r.path for r in hub_with_bundled_weights.requests if "safetensors" in r.path]
    assert downloads and all(PINNED in path for path in downloads)


def test_reference_mode_refuses_when_the_hub_head_moved_past_the_pin(
    hub_with_bundled_weights, compose, tracking_uri, tmp_path
) -> None:
    cfg = compose(
        "model=phi3-mini-4k", "wrap.save_pretrained=false", f"fetch.cache_dir={tmp_path / 'c'}"
    )
    fetch.main(cfg)
    hub_with_bundled_weights.refs[REPO]["main"] = NEWER
    with pytest.raises(PipelineError, match=f"at its current head {NEWER}, but the fetched"):
        wrap_transformers.main(cfg)
