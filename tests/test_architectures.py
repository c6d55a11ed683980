"""The parity matrix: every text-only decoder architecture both runtimes build
(tests/architectures.py lists them from the installed builder and transformers), as a tiny
checkpoint with its own features switched on, built to ONNX fp32 and int8 by the project's
builder command line, against transformers fp32 on the same weights:

- the prompt ids: transformers' chat template and tokenizer against onnxruntime-genai's;
- the greedy tokens over a chat prompt longer than any sliding window in the matrix;
- teacher-forced next-token distributions over prompt and answer (steps.evaluation.fidelity's
  own scorer): mean KL divergence below 1e-4 for fp32; int8's is reported.

An architecture whose build is known not to match (steps/onnx/known_differences.py, what
add-model warns of) is an xfail that names what differs; strict, so a pin that fixes it fails
until that list and docs/models.md's table say so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from architectures import EOS, SLIDING_WINDOW, Architecture, build, matrix, write_checkpoint
from conftest import PROJECT_ROOT, report_line

from steps.evaluation.fidelity import Agreement

MATRIX = matrix()
PROMPT = [
    {"role": "system", "content": "You summarise in one sentence."},
    {
        "role": "user",
        "content": "Summarise: " + "The quick brown fox jumps over the lazy dog. " * 4,
    },
]
NEW_TOKENS = 12
KLD_FP32 = 1e-4
MEASURED: dict[str, dict[str, float]] = {}


@dataclass(frozen=True)
class Reference:
    """transformers fp32 on the checkpoint: the prompt, its greedy answer and the logits at
    every position of both."""

    prompt_ids: list[int]
    answer: list[int]
    logits: np.ndarray  # [len(prompt_ids + answer), vocab]


@pytest.fixture(scope="module")
def checkpoints(bundled_fetch, tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("architectures")
    yield root
    if MEASURED:
        report_line(
            "parity matrix (KLD to transformers fp32): "
            + ", ".join(
                f"{name} " + " ".join(f"{precision} {value:.1e}" for precision, value in m.items())
                for name, m in sorted(MEASURED.items())
            )
        )


@pytest.fixture(scope="module", params=MATRIX, ids=lambda a: a.name)
def architecture(request) -> Architecture:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(architecture: Architecture, checkpoints: Path, bundled_fetch) -> Path:
    folder = checkpoints / architecture.name / "hf"
    return write_checkpoint(architecture, bundled_fetch.model_dir, folder)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    windows = [getattr(model.config, "sliding_window", None) or 0, SLIDING_WINDOW]
    assert len(ids) > 2 * max(windows), "the prompt must slide every window"
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        answer = out[0, len(ids) :].tolist()
        logits = model(torch.tensor([ids + answer])).logits[0].float().numpy()
    return Reference(ids, answer, logits)


def known(differs: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(bool(differs), reason=differs, strict=True)


@dataclass(frozen=True)
class OnnxRun:
    prompt_ids: list[int]
    answer: list[int]
    logits: np.ndarray


def run_onnx(folder: Path, reference: Reference) -> OnnxRun:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    text = tokenizer.apply_chat_template(messages=json.dumps(PROMPT), add_generation_prompt=True)
    prompt_ids = [int(t) for t in tokenizer.encode(text)]
    ids = reference.prompt_ids
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    answer = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
    # Teacher-forced: the reference's whole sequence in one pass, logits at every position.
    forced = ids + reference.answer
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(forced))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(forced, dtype=np.int32)[None, :])
    logits = np.asarray(generator.get_output("logits")[0], dtype=np.float32)
    return OnnxRun(prompt_ids, answer, logits)


def kld(reference: Reference, onnx: OnnxRun) -> float:
    """Mean KL(transformers || onnx) over every position, by the evaluate step's scorer."""
    agreement = Agreement()
    targets = np.array(reference.prompt_ids + reference.answer)[1:]
    agreement.add(reference.logits[:-1], onnx.logits[:-1], targets)
    return agreement.summary()["kld_mean"]


def _expected_answer(reference: Reference) -> list[int]:
    # onnxruntime-genai leaves the end token out of the sequence; transformers keeps it.
    answer = reference.answer
    return answer[:-1] if answer and answer[-1] == EOS else answer


def measured(
    architecture: Architecture, checkpoint: Path, reference: Reference, precision: str
) -> tuple[OnnxRun, float]:
    """The `precision` build run on the parity prompt, its prompt ids checked and its KLD to
    transformers fp32 recorded for the report."""
    onnx = run_onnx(build(checkpoint, checkpoint.parent / precision, precision), reference)
    assert onnx.prompt_ids == reference.prompt_ids
    divergence = kld(reference, onnx)
    MEASURED.setdefault(architecture.name, {})[precision] = divergence
    return onnx, divergence


def test_fp32_gives_transformers_prompt_ids_greedy_tokens_and_distributions(
    architecture: Architecture, checkpoint: Path, reference: Reference, request
) -> None:
    request.applymarker(known(architecture.fp32_differs))
    onnx, divergence = measured(architecture, checkpoint, reference, "fp32")
    assert onnx.answer == _expected_answer(reference)
    assert divergence < KLD_FP32


def test_int8_builds_and_reads_the_same_prompt(
    architecture: Architecture, checkpoint: Path, reference: Reference, request
) -> None:
    request.applymarker(known(architecture.int8_differs))
    _, divergence = measured(architecture, checkpoint, reference, "int8")
    assert np.isfinite(divergence) and divergence > 0


DOCS = PROJECT_ROOT / "docs" / "models.md"
ROW = re.compile(r"^\| `(\w+)` \| `(\w+)` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", re.MULTILINE)


def test_the_docs_table_lists_every_architecture_and_what_fails() -> None:
    rows = {m[1]: m for m in ROW.finditer(DOCS.read_text())}
    assert sorted(rows) == sorted(a.name for a in MATRIX), "docs/models.md's parity table"
    for a in MATRIX:
        row = rows[a.name]
        assert row[2] == a.model_type, a.name
        assert row[4].strip().startswith("fails" if a.fp32_differs else "passes"), a.name
        assert ("fails" in row[5]) is bool(a.int8_differs), a.name
