"""`python -m steps add-model`: a Hub repo (through the real huggingface_hub client and the
loopback Hub) or a local folder becomes a conf/model variant that composes, reading only the
small files; a model the pipeline cannot run is refused in one line, and nothing is written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from steps.add_model import cli
from steps.config.compose import CONF_DIR, compose_config

REPO = "acme/Tiny-Chat-Instruct"
COMMIT = "c" * 40
NAME = "tiny-chat-instruct"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "max_position_embeddings": 32768,
    "num_hidden_layers": 2,
    "tie_word_embeddings": True,
}


def repo_files(config: dict | None = CONFIG, template: str | None = TEMPLATE) -> dict[str, bytes]:
    files = {
        "README.md": b"---\nlicense: apache-2.0\n---\n# Tiny chat\n",
        "model.safetensors": b"\0" * 4096,  # never read by add-model
        "tokenizer_config.json": json.dumps(
            {"chat_template": template} if template else {}
        ).encode(),
    }
    if config is not None:
        files["config.json"] = json.dumps(config).encode()
    return files


@pytest.fixture
def added() -> Iterator[list[Path]]:
    """The conf/model files a test may write, removed afterwards (conf/ is the real one)."""
    paths = [CONF_DIR / "model" / f"{NAME}.yaml"]
    assert not any(path.exists() for path in paths)
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def test_a_hub_repo_becomes_a_pinned_variant_that_composes(
    loopback_hub, added: list[Path], capsys
) -> None:
    hub = loopback_hub({REPO: {COMMIT: repo_files()}}, {REPO: {"main": COMMIT}})
    assert cli([REPO]) == 0
    written = yaml.safe_load(added[0].read_text())
    assert written["source"] == {
        "kind": "hub", "repo_id": REPO, "revision": COMMIT,
        "allow_patterns": ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "LICENSE"],
    }  # fmt: skip
    assert (written["license"], written["context_length"]) == ("apache-2.0", 32768)
    cfg = compose_config([f"model={NAME}"])
    assert cfg.model.source.pinned_commit and cfg.model.display_name == "Tiny-Chat-Instruct"
    assert f"mlflow run . --env-manager local -P model={NAME}" in capsys.readouterr().out
    assert not [r for r in hub.requests if "safetensors" in r.path]


def test_a_local_folder_becomes_a_local_variant(tmp_path: Path, added: list[Path]) -> None:
    folder = tmp_path / NAME
    folder.mkdir()
    for path, data in repo_files().items():
        (folder / path).write_bytes(data)
    assert cli([str(folder)]) == 0
    cfg = compose_config([f"model={NAME}"])
    assert (cfg.model.source.kind.value, cfg.model.source.path) == ("local", str(folder))


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [
        (repo_files(config=None), [], "has no readable config.json"),
        (repo_files(CONFIG | {"model_type": "nonesuch"}), [], "does not know model_type"),
        (
            repo_files(CONFIG | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}),
            [],
            "GPT2LMHeadModel is supported by transformers only; the pipeline needs both "
            "(nearest that both build:",
        ),
        (repo_files(CONFIG | {"auto_map": {"AutoConfig": "x.Config"}}), [], "trust_remote_code"),
        (repo_files(template=None), [], "has no chat template"),
        (
            repo_files(
                CONFIG | {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
            ),
            [],
            "the installed onnxruntime-genai builder cannot build Gemma3ForCausalLM (the builder "
            "reads config.rope_parameters['rope_type']",
        ),
        (
            repo_files(
                CONFIG
                | {"model_type": "granitemoehybrid", "layer_types": ["mamba", "attention"]}
                | {"architectures": ["GraniteMoeHybridForCausalLM"]}
            ),
            [],
            "cannot build GraniteMoeHybridForCausalLM (the builder makes attention layers only",
        ),
        (repo_files(), ["--revision", "nonesuch"], "has no revision 'nonesuch'"),
        (repo_files(), ["--name", "Bad Name"], "is not a usable variant name"),
        (repo_files(), ["--name", "smollm2-135m"], "exists: pass --force to replace it"),
    ],
)
def test_a_model_the_pipeline_cannot_run_is_refused_in_one_line_and_nothing_is_written(
    loopback_hub, added: list[Path], capsys, files: dict, args: list[str], expected: str
) -> None:
    loopback_hub({REPO: {COMMIT: files}}, {REPO: {"main": COMMIT}})
    before = sorted((CONF_DIR / "model").iterdir())
    assert cli([REPO, *args]) != 0
    err = capsys.readouterr().err  # the Hub client's progress bars, then the error
    (line,) = [line for line in err.splitlines() if line.startswith("error: add-model: ")]
    assert expected in line and "Traceback" not in err, err
    assert sorted((CONF_DIR / "model").iterdir()) == before


@pytest.mark.parametrize(
    ("config", "warned"),
    [
        (CONFIG, None),
        ({**CONFIG, "use_sliding_window": True, "sliding_window": 4096}, "differ past the window"),
        (
            {**CONFIG, "model_type": "olmo", "architectures": ["OlmoForCausalLM"]},
            "every ONNX build differs: the builder normalizes with SimplifiedLayerNormalization",
        ),
    ],
)
def test_a_known_onnx_difference_is_written_with_a_warning(
    loopback_hub, added: list[Path], capsys, config: dict, warned: str | None
) -> None:
    loopback_hub({REPO: {COMMIT: repo_files(config)}}, {REPO: {"main": COMMIT}})
    assert cli([REPO]) == 0
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")
    ]
    header = [line for line in added[0].read_text().splitlines() if "Known ONNX" in line]
    if warned is None:
        assert warnings == [] and header == []
    else:
        (warning,) = warnings
        assert warned in warning and warned in header[0], (warning, header)


def test_a_gated_repo_without_a_token_says_how_to_get_access(loopback_hub, capsys) -> None:
    loopback_hub({REPO: {COMMIT: repo_files()}}, {REPO: {"main": COMMIT}}, gated={REPO})
    assert cli([REPO]) != 0
    assert "is gated: accept its terms" in capsys.readouterr().err
