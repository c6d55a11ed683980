"""The Phi-3 family through the whole pipeline, as a user with Hub access runs it: the loopback
Hub serves a same-architecture checkpoint of each variant (tests/phi3_family.py) at the
variant's pinned repo and revision, and a builder-made int4 CPU export under the variant's real
prebuilt subfolder at the export repo's pin. One `mlflow run .` per variant fetches, wraps both
runtimes (the ONNX model built from the weights, and the prebuilt export:
`wrap.onnx_source=both`), evaluates and registers; then the logged models are checked for
parity, Phi-3's chat format and its end tokens, and the champion answers over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from conftest import (
    Phi3Checkpoint,
    PipelineJob,
    project_env,
    report_line,
    run_pipelines_at_once,
)
from fake_hub import FakeHub
from mlflow import MlflowClient
from phi3_family import END, ENDOFTEXT, STOP_AT_END, STOP_AT_ENDOFTEXT, SYSTEM, VARIANTS

from steps.config.schema import Runtime, model_label
from steps.serving.processes import model_server

# What both runtimes are compared on: a system prompt, an empty one (the 3.5 template leaves
# it out), and a prompt past the LongRoPE variants' original context.
PROMPTS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Summarise: " + "The quick brown fox jumps over the dog. " * 12}],
]
# The served models refuse an empty message (steps/serving/onnx_chat_model.py): the logged
# models are asked the others; the tokenizers and templates are compared on all of them.
ASKED = [m for m in PROMPTS if all(message["content"] for message in m)]
# Less work than the defaults; a random model answers nothing right, so no accuracy floor.
# Every candidate is asked (evaluate.ask=all): the int4 export of a random model may fail
# fidelity, and its answers are what the test checks the export path by.
FAST = (
    "compute.onnx_candidates=[fp32] evaluate.max_items=12 evaluate.timed_items=4 "
    "evaluate.fidelity.scored_tokens=256 evaluate.max_new_tokens=8 register.min_accuracy=0 "
    "evaluate.ask=all main.parallel=true"
)


@dataclass(frozen=True)
class VariantRun:
    checkpoint: Phi3Checkpoint
    tracking_uri: str
    parent: mlflow.entities.Run

    def child(self, name: str) -> mlflow.entities.Run:
        return MlflowClient(self.tracking_uri).get_run(self.parent.data.tags[f"main.{name}.run_id"])


@pytest.fixture(scope="session")
def phi3_pipelines(
    phi3_checkpoints: dict[str, Phi3Checkpoint], phi3_hub: FakeHub, tmp_path_factory
) -> dict[str, VariantRun]:
    """`mlflow run . -P model=<variant>` for the three variants at once (as three scheduled
    jobs would run), each into its own SQLite store and caches."""
    started, jobs = time.monotonic(), {}
    for name in sorted(VARIANTS):
        tmp = tmp_path_factory.mktemp(name)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        env = project_env(uri, **phi3_hub.env(tmp / "hf", TMPDIR=str(tmp)))
        overrides = f"wrap.onnx_source=both {FAST} fetch.cache_dir={tmp / 'cache'}"
        args = ("-P", f"model={name}", "-P", f"overrides={overrides}")
        jobs[name] = PipelineJob(uri, env, args, tmp / "mlflow-run.log")
    runs = {}
    for name, parent in run_pipelines_at_once(jobs).items():
        client = MlflowClient(jobs[name].tracking_uri)
        runs[name] = VariantRun(phi3_checkpoints[name], jobs[name].tracking_uri, parent)
        steps = {
            tag.removeprefix("main.").removesuffix(".run_id"): client.get_run(value).info
            for tag, value in parent.data.tags.items()
            if tag.startswith("main.") and tag.endswith(".run_id")
        }
        took = {step: (info.end_time - info.start_time) / 1000 for step, info in steps.items()}
        print(f"\n{name}: step seconds {took}")
    report_line(f"three Phi-3 pipelines at once: {time.monotonic() - started:.1f} s")
    return runs


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_run(request, phi3_pipelines, monkeypatch_module) -> VariantRun:
    run = phi3_pipelines[request.param]
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", run.tracking_uri)
    mlflow.set_tracking_uri(run.tracking_uri)
    return run


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_pipeline_wraps_both_sources_evaluates_and_registers(variant_run: VariantRun) -> None:
    tags = variant_run.parent.data.tags
    v = variant_run.checkpoint.variant
    export_label = model_label(Runtime.onnx, v.cpu_export.subfolder.split("/")[-1])
    assert {"main.model_uri.transformers-fp32", "main.model_uri.onnx-fp32",
            f"main.model_uri.{export_label}"} <= set(tags)  # fmt: skip
    fetch_run_id = variant_run.child("fetch").info.run_id
    manifest = mlflow.artifacts.load_dict(f"runs:/{fetch_run_id}/manifest.json")
    assert manifest["source"]["repo_id"] == v.repo_id
    assert manifest["source"]["resolved_revision"] == v.revision
    prebuilt = variant_run.child("wrap_onnx")
    assert prebuilt.data.tags["onnx.source"] == "prebuilt"
    assert variant_run.child("wrap_onnx.fp32").data.tags["onnx.source"] == "build"
    evaluate = variant_run.child("evaluate").data.metrics
    for label in ("transformers-fp32", "onnx-fp32", export_label):
        assert f"{label}.accuracy" in evaluate
    # fp32 ONNX is the same model as fp32 transformers; the int4 export is not.
    assert evaluate["onnx-fp32.kld_mean"] < 1e-3
    assert evaluate["onnx-fp32.top1_agreement"] >= 0.99
    assert evaluate[f"{export_label}.kld_mean"] > evaluate["onnx-fp32.kld_mean"]
    assert tags["main.registered"].endswith("@champion")


def _logged(variant_run: VariantRun, label: str) -> str:
    return variant_run.parent.data.tags[f"main.model_uri.{label}"]


def test_fp32_runtimes_give_the_same_prompt_and_greedy_ids(variant_run: VariantRun) -> None:
    """Parity on the logged weights: the same prompt ids from the same messages (the template's
    system rule included), the same greedy ids, the same end token; on the LongRoPE variants
    with a prompt past original_max_position_embeddings."""
    import onnxruntime_genai as og
    import torch

    variant = variant_run.checkpoint.variant
    components = mlflow.transformers.load_model(
        _logged(variant_run, "transformers-fp32"), return_type="components"
    )
    model, tokenizer = components["model"].eval(), components["tokenizer"]
    onnx_dir = Path(mlflow.artifacts.download_artifacts(_logged(variant_run, "onnx-fp32")))
    og_model = og.Model(str(next(onnx_dir.rglob("genai_config.json")).parent))
    og_tokenizer = og.Tokenizer(og_model)
    ends = {id(STOP_AT_END): END, id(STOP_AT_ENDOFTEXT): ENDOFTEXT}
    longest = 0
    for messages in [*PROMPTS, STOP_AT_END, STOP_AT_ENDOFTEXT]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        text = og_tokenizer.apply_chat_template(
            messages=json.dumps(messages), add_generation_prompt=True
        )
        assert list(og_tokenizer.encode(text)) == ids, messages
        if messages[0] == {"role": "system", "content": ""}:
            # Phi-3.5's template leaves an empty system message out; 4k's and 128k's keep it.
            assert (SYSTEM in ids) is not bool(variant.system_condition)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        expected = out[0, len(ids) :].tolist()
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=len(ids) + 12, do_sample=False)
        generator = og.Generator(og_model, params)
        generator.append_tokens(np.array(ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        got = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        if id(messages) in ends:
            assert expected[-1] == ends[id(messages)], messages
        if expected[-1] in variant.generation_eos:
            # onnxruntime-genai leaves the end token out of the sequence; transformers keeps it.
            assert got == expected[:-1], messages
        else:
            assert got == expected, messages
        longest = max(longest, len(ids))
    if variant.longrope:
        assert longest > variant.original_max_position_embeddings, "no prompt crossed it"


def _ask(model, messages, max_tokens: int = 16) -> dict:
    return model.predict({"messages": messages, "max_tokens": max_tokens})[0]


@pytest.fixture(scope="module")
def loaded(variant_run: VariantRun) -> dict:
    """The fp32 models of both runtimes, as pyfunc models loaded from the pipeline's runs."""
    labels = ("transformers-fp32", "onnx-fp32")
    return {label: mlflow.pyfunc.load_model(_logged(variant_run, label)) for label in labels}


@pytest.mark.parametrize("label", ["transformers-fp32", "onnx-fp32"])
def test_the_turn_ends_at_phi3s_end_tokens(loaded: dict, label: str) -> None:
    """The checkpoint ends STOP_AT_END's answer with <|end|> and STOP_AT_ENDOFTEXT's with
    <|endoftext|> (forced: see tests/phi3_family.py); both runtimes stop there, say `stop`, and
    keep special tokens out of the content. A short max_tokens ends with `length`."""
    for messages in (STOP_AT_END, STOP_AT_ENDOFTEXT):
        answer = _ask(loaded[label], messages)
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", (messages, answer)
        assert answer["usage"]["completion_tokens"] < 16
        assert choice["message"]["content"] and "<|" not in choice["message"]["content"]
    answer = _ask(loaded[label], PROMPTS[0], max_tokens=3)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 3
    assert "<|" not in answer["choices"][0]["message"]["content"]


def test_both_runtimes_answer_alike(loaded: dict) -> None:
    contents = {
        label: [_ask(model, m)["choices"][0]["message"]["content"] for m in ASKED]
        for label, model in loaded.items()
    }
    assert contents["transformers-fp32"] == contents["onnx-fp32"]


def test_the_champion_answers_by_alias_over_http(variant_run: VariantRun, tmp_path: Path) -> None:
    name = variant_run.parent.data.tags["main.registered"].partition(" v")[0]
    uri = f"models:/{name}@champion"
    with model_server(uri, variant_run.tracking_uri, tmp_path / "serve.log") as url:
        reply = requests.post(
            f"{url}/invocations",
            json={"messages": STOP_AT_END, "max_tokens": 16},
            timeout=120,
        )
    assert reply.status_code == 200, reply.text
    (answer,) = reply.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert "<|" not in answer["choices"][0]["message"]["content"]


def test_an_architecture_the_builder_cannot_build_fails_before_building(tmp_path: Path) -> None:
    from steps.errors import PipelineError
    from steps.onnx.build import check_buildable, supported_architectures

    assert {"Phi3ForCausalLM", "LlamaForCausalLM"} <= supported_architectures()
    (tmp_path / "config.json").write_text('{"architectures": ["MambaForCausalLM"]}')
    with pytest.raises(PipelineError) as raised:
        check_buildable(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'config.json'} names MambaForCausalLM, which the")
    assert "wrap.onnx_source=prebuilt" in message and "\n" not in message
