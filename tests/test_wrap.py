"""wrap_transformers and wrap_onnx on the bundled model: two logged chat models that answer the
same schema, the same greedy tokens at fp32, and bad requests with clear errors."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import WrappedModels
from mlflow.exceptions import MlflowException

from steps.config.compose import compose_config
from steps.errors import PipelineError
from steps.onnx.build import build_inputs, build_onnx
from steps.store.manifest import mismatched_files
from steps.store.snapshot_store import SnapshotStore
from steps.wrap_onnx import check_provider, link_or_copy
from steps.wrap_transformers import check_device

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["What is the capital of France?", "What is 2+2?", "Write a haiku about the sea."]
CHATML_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def onnx_model(wrapped: WrappedModels):
    mlflow.set_tracking_uri(wrapped.tracking_uri)
    return mlflow.pyfunc.load_model(wrapped.onnx_uri)


def test_both_models_answer_chat_alike_in_a_fresh_process(wrapped: WrappedModels) -> None:
    script = textwrap.dedent(
        f"""
        import json, mlflow
        mlflow.set_tracking_uri({wrapped.tracking_uri!r})
        request = {{"messages": {QUESTION!r}, "max_tokens": 24}}
        answers = {{}}
        for name, uri in (("transformers", {wrapped.transformers_uri!r}),
                          ("onnx", {wrapped.onnx_uri!r})):
            answers[name] = mlflow.pyfunc.load_model(uri).predict(request)
        print("ANSWERS" + json.dumps(answers))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.split("ANSWERS", 1)[1])
    for name, (answer,) in answers.items():
        assert set(answer) >= {"id", "object", "created", "model", "choices", "usage"}, name
        assert answer["object"] == "chat.completion"
        choice = answer["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert "Paris" in choice["message"]["content"], name
        assert choice["finish_reason"] == "stop"
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    transformers, onnx = answers["transformers"][0], answers["onnx"][0]
    # fp32 on both sides: the same greedy answer, counted the same way.
    assert onnx["choices"][0]["message"] == transformers["choices"][0]["message"]
    assert onnx["usage"] == transformers["usage"]
    assert onnx["model"] == "smollm2-135m-onnx-fp32-cpu"


def test_fp32_onnx_and_fp32_transformers_generate_the_same_token_ids(
    wrapped: WrappedModels, bundled_fetch, onnx_model
) -> None:
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = onnx_model.unwrap_python_model()._model  # the og.Model the pyfunc loaded
    tokenizer_og = og.Tokenizer(folder)
    hf_tokenizer = AutoTokenizer.from_pretrained(bundled_fetch.model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(bundled_fetch.model_dir, dtype=torch.float32)
    eos = hf_tokenizer.eos_token_id
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        hf_ids = hf_tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        og_ids = tokenizer_og.encode(
            tokenizer_og.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        )
        assert og_ids.tolist() == hf_ids[0].tolist(), "the two runtimes see different prompts"
        expected = hf_model.generate(hf_ids, max_new_tokens=40, do_sample=False)[0][
            hf_ids.shape[1] :
        ]
        expected = [t for t in expected.tolist() if t != eos]  # og leaves the end token out
        params = og.GeneratorParams(folder)
        params.set_search_options(max_length=len(og_ids) + 40, do_sample=False)
        generator = og.Generator(folder, params)
        generator.append_tokens(og_ids)
        while not generator.is_done():
            generator.generate_next_token()
        assert generator.get_sequence(0)[len(og_ids) :].tolist() == expected, prompt


def test_onnx_model_answers_the_legacy_prompt_form_with_a_string(onnx_model) -> None:
    answer = onnx_model.predict({"prompt": CHATML_PROMPT, "max_tokens": 24})
    assert isinstance(answer, str)
    assert "4" in answer


def test_every_row_of_a_batch_is_answered(onnx_model) -> None:
    requests = [{"messages": [{"role": "user", "content": prompt}]} for prompt in PROMPTS[:2]]
    answers = onnx_model.predict(requests)
    assert len(answers) == 2
    assert "Paris" in answers[0]["choices"][0]["message"]["content"]
    assert "4" in answers[1]["choices"][0]["message"]["content"]


def test_stream_chunks_add_up_to_the_whole_answer(onnx_model) -> None:
    request = {"messages": QUESTION, "max_tokens": 24}
    chunks = list(onnx_model.predict_stream(request))
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = onnx_model.predict(request)[0]
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_temperature_stop_max_tokens_and_n_act_as_openai_documents_them(onnx_model) -> None:
    greedy = onnx_model.predict({"messages": QUESTION})[0]
    zero = onnx_model.predict({"messages": QUESTION, "temperature": 0})[0]
    assert zero["choices"][0]["message"] == greedy["choices"][0]["message"]
    cut = onnx_model.predict({"messages": QUESTION, "stop": ["Paris"]})[0]["choices"][0]
    assert cut["message"]["content"] == "The capital of France is "
    assert cut["finish_reason"] == "stop"
    short = onnx_model.predict({"messages": QUESTION, "max_tokens": 3})[0]
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3
    two = onnx_model.predict({"messages": QUESTION, "n": 2, "temperature": 0.9, "top_p": 0.9})[0]
    assert [choice["index"] for choice in two["choices"]] == [0, 1]


def test_the_thread_count_is_a_load_setting_that_keeps_the_answers(
    wrapped: WrappedModels, onnx_model
) -> None:
    """The logged model counts the serving machine's cores at load time unless told a number
    (compute.onnx_threads); greedy answers must not depend on it."""
    logged = onnx_model.metadata.flavors["python_function"]["config"]
    assert logged["intra_op_threads"] is None
    one_thread = mlflow.pyfunc.load_model(wrapped.onnx_uri, model_config={"intra_op_threads": 1})
    for prompt in PROMPTS:
        request = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24}
        alone = one_thread.predict(request)[0]["choices"][0]["message"]
        assert alone == onnx_model.predict(request)[0]["choices"][0]["message"], prompt


def test_concurrent_predicts_give_independent_correct_answers(onnx_model) -> None:
    requests = [{"messages": [{"role": "user", "content": p}], "max_tokens": 24} for p in PROMPTS]
    sequential = [onnx_model.predict(r)[0]["choices"][0]["message"] for r in requests]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda r: onnx_model.predict(r)[0], requests * 2))
    assert [a["choices"][0]["message"] for a in answers] == sequential * 2


def test_a_stop_string_or_a_closed_stream_frees_the_engine(onnx_model) -> None:
    """Cancelled turns leave the engine: later requests are answered as if alone."""
    alone = onnx_model.predict({"messages": QUESTION, "max_tokens": 24})[0]
    stream = onnx_model.predict_stream({"messages": QUESTION, "max_tokens": 24})
    next(stream)
    stream.close()
    stopped = onnx_model.predict({"messages": QUESTION, "max_tokens": 24, "stop": ["France"]})
    assert stopped[0]["choices"][0]["message"]["content"] == "The capital of "
    again = onnx_model.predict({"messages": QUESTION, "max_tokens": 24})[0]
    assert again["choices"] == alone["choices"] and again["usage"] == alone["usage"]


def test_the_engine_thread_ends_with_its_model(wrapped: WrappedModels) -> None:
    def engine_threads() -> set[threading.Thread]:
        return {thread for thread in threading.enumerate() if thread.name == "og-engine"}

    before = engine_threads()
    first = mlflow.pyfunc.load_model(wrapped.onnx_uri)
    (thread,) = engine_threads() - before
    del first
    # MLflow keeps the model object a models-from-code file made until the next one is loaded.
    second = mlflow.pyfunc.load_model(wrapped.onnx_uri)
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert "Paris" in second.predict({"messages": QUESTION})[0]["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"max_tokens": 5}, "needs either `messages` (chat) or `prompt` (legacy)"),
        ({"messages": []}, "`messages` must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role='robot' is not one of"),
        ({"messages": [{"role": "user", "content": "  "}]}, "content must be a non-empty string"),
        ({"messages": QUESTION, "max_tokens": 0}, "`max_tokens` must be a positive integer"),
        ({"messages": QUESTION, "temperature": -1.0}, "`temperature` must be >= 0"),
        ({"messages": QUESTION, "n": 99}, "`n` must be at most 8"),
        (
            {"messages": [{"role": "user", "content": "word " * 9000}]},
            "context window is 8192: shorten the conversation",
        ),
    ],
)
def test_bad_requests_get_a_clear_error(onnx_model, request_body, message) -> None:
    with pytest.raises(MlflowException) as raised:
        onnx_model.predict(request_body)
    assert message in raised.value.message


def test_input_examples_pass_mlflow_serving_validation(wrapped: WrappedModels) -> None:
    mlflow.set_tracking_uri(wrapped.tracking_uri)
    for uri in (wrapped.transformers_uri, wrapped.onnx_uri):
        example = mlflow.models.Model.load(uri).load_input_example(
            mlflow.artifacts.download_artifacts(uri)
        )
        serving = mlflow.models.convert_input_example_to_serving_input(example)
        assert mlflow.models.validate_serving_input(uri, serving)


def test_logged_models_pin_minimal_requirements_and_link_to_the_fetch(
    wrapped: WrappedModels,
) -> None:
    mlflow.set_tracking_uri(wrapped.tracking_uri)
    for uri, must, never in (
        (wrapped.onnx_uri, {"onnxruntime-genai", "mlflow", "numpy"}, {"torch", "transformers"}),
        (wrapped.transformers_uri, {"mlflow", "transformers", "torch"}, {"torchvision"}),
    ):
        local = Path(mlflow.artifacts.download_artifacts(uri))
        requirements = (local / "requirements.txt").read_text().splitlines()
        lines = [line for line in requirements if line and line[0].isalpha()]
        names = {line.split("==")[0] for line in lines}
        assert must <= names and not names & never, (uri, lines)
        assert all("==" in line for line in lines), lines
        model = mlflow.get_logged_model(uri.removeprefix("models:/"))
        assert model.tags["fetch.run_id"] == wrapped.fetch_run_id
    local = Path(mlflow.artifacts.download_artifacts(wrapped.transformers_uri))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["metadata"]["task"] == "llm/v1/chat"
    assert mlmodel["flavors"]["transformers"]["inference_task"] == "llm/v1/chat"


def test_unavailable_provider_fails_at_load_naming_the_package(wrapped: WrappedModels) -> None:
    mlflow.set_tracking_uri(wrapped.tracking_uri)
    with pytest.raises(MlflowException, match="needs the onnxruntime-genai-cuda package"):
        mlflow.pyfunc.load_model(wrapped.onnx_uri, model_config={"provider": "cuda"})


def test_gpu_targets_fail_fast_in_the_wrap_steps() -> None:
    cuda = compose_config(["compute=cuda"]).compute
    dml = compose_config(["compute=dml"]).compute
    with pytest.raises(PipelineError, match="compute=cuda needs a CUDA GPU"):
        check_device(cuda)
    with pytest.raises(PipelineError, match="needs the onnxruntime-genai-cuda package"):
        check_provider(cuda)
    with pytest.raises(PipelineError, match="needs the onnxruntime-genai-directml package"):
        check_provider(dml)


def test_rebuilding_the_same_onnx_inputs_is_a_cache_hit(bundled_fetch, session_cache) -> None:
    inputs = build_inputs(bundled_fetch.manifest.snapshot_id, "fp32", "cpu", {})
    store = SnapshotStore(session_cache)
    first = build_onnx("smollm2-135m", bundled_fetch.model_dir, inputs, store)
    again = build_onnx("smollm2-135m", bundled_fetch.model_dir, inputs, store)
    assert again.cache == "hit"
    assert again.manifest.snapshot_id == first.manifest.snapshot_id
    assert {e.path for e in again.manifest.files} >= {"genai_config.json", "model.onnx"}


def test_the_logged_onnx_model_holds_real_files_with_the_cached_bytes(
    wrapped: WrappedModels, bundled_fetch, session_cache
) -> None:
    inputs = build_inputs(bundled_fetch.manifest.snapshot_id, "fp32", "cpu", {})
    store = SnapshotStore(session_cache)
    built = build_onnx("smollm2-135m", bundled_fetch.model_dir, inputs, store)
    mlflow.set_tracking_uri(wrapped.tracking_uri)
    logged = Path(mlflow.artifacts.download_artifacts(wrapped.onnx_uri)) / "artifacts/onnx_model"
    assert mismatched_files(logged, built.manifest.files) == []
    assert not [path for path in logged.rglob("*") if path.is_symlink()]


def test_staging_the_onnx_folder_links_the_blobs_and_copies_across_file_systems(
    tmp_path: Path,
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.onnx").symlink_to("../blob")  # as the store links
    shutil.copytree(tmp_path / "snapshot", tmp_path / "staged", copy_function=link_or_copy)
    staged = tmp_path / "staged" / "model.onnx"
    assert not staged.is_symlink() and staged.stat().st_ino == blob.stat().st_ino
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev:
        with tempfile.TemporaryDirectory(dir=shm) as other:
            link_or_copy(str(blob), f"{other}/model.onnx")
            copied = Path(other) / "model.onnx"
            assert copied.read_bytes() == b"weights"
            assert copied.stat().st_ino != blob.stat().st_ino


def test_the_transformers_flavor_refuses_n_and_keeps_the_stop_string_as_the_readme_says(
    wrapped: WrappedModels,
) -> None:
    mlflow.set_tracking_uri(wrapped.tracking_uri)
    model = mlflow.pyfunc.load_model(wrapped.transformers_uri)
    greedy = model.predict({"messages": QUESTION, "max_tokens": 16})[0]["choices"][0]
    zero = model.predict({"messages": QUESTION, "max_tokens": 16, "temperature": 0})[0]
    assert zero["choices"][0]["message"] == greedy["message"]
    with pytest.raises(MlflowException, match="not valid for pipeline"):
        model.predict({"messages": QUESTION, "n": 2})
    stopped = model.predict({"messages": QUESTION, "stop": ["Paris"]})[0]["choices"][0]
    assert stopped["message"]["content"].endswith("Paris")
