"""The benchmark's arithmetic, on the real bundled model: the bytes a decode step reads (the
numerator of the memory-bandwidth bound), how a timed sample is cut to a shorter generation,
and how variants are named. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest

from bench.decode_bytes import gguf_decode_bytes, onnx_decode_bytes, safetensors_decode_bytes
from bench.models import parse_variant, variant_label
from bench.runtimes import RuntimeSpec, Sample
from steps.config.onnx_builds import OnnxBuildSpec
from steps.onnx.build import build_inputs, build_onnx
from steps.store.snapshot_store import SnapshotStore


@pytest.fixture(scope="module")
def checkpoint(bundled_fetch) -> dict:
    return json.loads((bundled_fetch.model_dir / "config.json").read_text())


def test_the_fp32_checkpoint_reads_every_parameter_once_and_one_embedding_row(
    bundled_fetch, checkpoint
) -> None:
    from safetensors import safe_open

    (weights_file,) = bundled_fetch.model_dir.glob("*.safetensors")
    with safe_open(weights_file, framework="numpy") as tensors:
        shapes = [tensors.get_slice(name).get_shape() for name in tensors.keys()]  # noqa: SIM118
    parameters = sum(math.prod(shape) for shape in shapes)
    counted = safetensors_decode_bytes(bundled_fetch.model_dir)
    # Tied embeddings: the output projection reads the whole table, the input one row of it.
    assert checkpoint["tie_word_embeddings"]
    assert counted.weights == 4 * parameters
    assert counted.rows == 4 * checkpoint["hidden_size"]
    head_size = checkpoint["hidden_size"] // checkpoint["num_attention_heads"]
    per_position = 2 * checkpoint["num_hidden_layers"] * checkpoint["num_key_value_heads"]
    assert counted.kv_per_position == per_position * head_size * 4 == 46_080
    assert counted.at(10) == counted.weights + counted.rows + 10 * 46_080


def test_an_fp32_onnx_build_reads_the_same_weights_and_kv_cache_as_its_checkpoint(
    bundled_fetch, session_cache
) -> None:
    inputs = build_inputs(bundled_fetch.manifest.snapshot_id, "fp32", "cpu", {})
    built = build_onnx(
        "smollm2-135m", bundled_fetch.model_dir, inputs, SnapshotStore(session_cache)
    )
    onnx = onnx_decode_bytes(built.model_dir)
    checkpoint = safetensors_decode_bytes(bundled_fetch.model_dir)
    assert onnx.weights == checkpoint.weights
    assert onnx.kv_per_position == checkpoint.kv_per_position
    # The table is read whole by the output projection; rows are the rotary caches' (cos and
    # sin, head_size / 2 floats each).
    assert onnx.rows == 2 * 32 * 4


def test_the_bundled_gguf_reads_its_quantized_layers_and_the_whole_tied_table(
    bundled_fetch, session_cache
) -> None:
    from gguf import GGUFReader

    gguf = SnapshotStore(session_cache).blob_path(
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    )
    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    counted = gguf_decode_bytes(gguf)
    assert "output.weight" not in tensors  # tied: token_embd is also the output projection
    assert counted.weights == sum(int(t.n_bytes) for t in tensors.values())
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert counted.rows == 576 // 32 * 34  # one Q8_0 row: 18 blocks of 32 weights in 34 bytes
    assert counted.kv_per_position == 2 * 30 * 3 * 64 * 2  # llama.cpp's f16 cache


def test_a_sample_cut_to_its_first_tokens_is_that_shorter_generation() -> None:
    stamps = (0.5, 0.6, 0.7, 0.8, 0.9)
    sample = Sample(prompt_tokens=20, new_tokens=5, total_s=0.9, ttft_s=0.5, token_s=stamps)
    first3 = sample.first(3)
    assert (first3.new_tokens, first3.total_s, first3.ttft_s) == (3, 0.7, 0.5)
    assert first3.decode_tokens_per_s == pytest.approx(2 / 0.2)
    assert first3.prefill_tokens_per_s == pytest.approx(40)
    with pytest.raises(ValueError, match="no timestamps for 6 tokens"):
        sample.first(6)


def test_variants_are_named_as_the_wrap_step_names_them() -> None:
    assert parse_variant("int4:algo_config=k_quant_last,block_size=64") == OnnxBuildSpec(
        "int4", {"algo_config": "k_quant_last", "block_size": "64"}
    )
    assert variant_label("int4:algo_config=k_quant_last") == "onnx-int4-k_quant_last"
    assert variant_label("fp32") == "onnx-fp32"
    with pytest.raises(SystemExit, match="option=value"):
        parse_variant("int4:k_quant_last")
    with pytest.raises(ValueError, match="unknown runtime kind 'vllm'; valid: transformers"):
        RuntimeSpec("x", "vllm", "/nowhere")


def test_the_serving_bench_compares_decode_rates_of_constrained_and_free_streams() -> None:
    from bench.serving import (
        OPENAI_JSON,
        OPENAI_STREAM,
        Answer,
        Outcome,
        Trial,
        markdown,
        summarize,
    )

    def trial(mode: str, tokens: int, decode_s: float) -> Trial:
        answers = [Answer("a", tokens, None, first_token_s=0.1, decode_s=decode_s)] * 2
        return Trial("onnx", mode, 1, 2.0, [Outcome(0, 1.0, answer) for answer in answers])

    free, constrained = summarize([trial(OPENAI_STREAM, 33, 0.4), trial(OPENAI_JSON, 21, 0.3)])
    assert free.decode_tokens_per_s == pytest.approx(32 / 0.4)
    assert constrained.decode_tokens_per_s == pytest.approx(20 / 0.3)
    assert constrained.server_cost is None  # no in-process mode was timed
    assert "- onnx, 1 clients: 0.833" in markdown([free, constrained])
    # Timed alone, openai-json has nothing to be compared with: no ratio, and no heading either.
    assert "Structured outputs" not in markdown([constrained])
