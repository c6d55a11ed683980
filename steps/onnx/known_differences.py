"""Where the installed onnxruntime-genai builder does not reproduce transformers, by architecture
and the config.json features that trigger it.

The parity matrix (tests/test_architectures.py, table in docs/models.md) found these with
onnxruntime-genai 0.18.0 and transformers 5.24.0: every entry is a strict xfail there, so a pin
that fixes one fails the suite until it leaves this list. `python -m steps add-model` refuses a
model whose ONNX build cannot be made and warns of the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Affects(Enum):
    """What a difference costs, as the warning names it."""

    NO_BUILD = "the ONNX builds cannot be made"  # the pipeline cannot finish
    LONG_PROMPTS = "the ONNX builds differ past the window"  # and fail past twice the window
    FP32 = "every ONNX build differs"  # builds and runs, but not the model transformers runs
    QUANTIZED = "the int8 and int4 builds cannot be made"  # fp32 matches


@dataclass(frozen=True)
class KnownDifference:
    architecture: str
    affects: Affects
    says: str
    applies: Callable[[dict[str, Any]], bool] = lambda config: True


def _windowed(config: dict[str, Any]) -> bool:
    return bool(config.get("sliding_window"))


def _qwen2_windowed(config: dict[str, Any]) -> bool:
    return bool(config.get("use_sliding_window")) and _windowed(config)


def _experts(config: dict[str, Any]) -> bool:
    return bool(config.get("num_local_experts"))


def _mamba_layers(config: dict[str, Any]) -> bool:
    return "mamba" in (config.get("layer_types") or [])


WINDOW_CACHE = (
    "onnxruntime-genai's cache holds 2 x sliding_window positions, so a longer sequence fails "
    "in GroupQueryAttention"
)
KNOWN_DIFFERENCES = (
    KnownDifference(
        "Gemma3ForCausalLM", Affects.NO_BUILD,
        "the builder reads config.rope_parameters['rope_type'], which transformers 5 nests per "
        "layer type for Gemma 3 (KeyError: 'rope_type')",
    ),
    KnownDifference(
        "MistralForCausalLM", Affects.LONG_PROMPTS,
        "the builder writes sliding_window into genai_config.json but not into the attention "
        f"(ONNX attends to the whole sequence), and {WINDOW_CACHE}",
        _windowed,
    ),
    KnownDifference(
        "Qwen2ForCausalLM", Affects.LONG_PROMPTS, f"with use_sliding_window on, {WINDOW_CACHE}",
        _qwen2_windowed,
    ),
    KnownDifference(
        "OlmoForCausalLM", Affects.FP32,
        "the builder normalizes with SimplifiedLayerNormalization (RMSNorm, weight 1) where "
        "OLMo's LayerNorm subtracts the mean: the distributions differ from the first layer",
    ),
    KnownDifference(
        "GraniteMoeHybridForCausalLM", Affects.NO_BUILD,
        "the builder makes attention layers only: a Mamba layer fails (AttributeError on "
        "self_attn)",
        _mamba_layers,
    ),
    KnownDifference(
        "GraniteMoeHybridForCausalLM", Affects.FP32,
        "the builder builds each layer's shared MLP only and drops the experts "
        "(block_sparse_moe)",
        _experts,
    ),
    KnownDifference(
        "GptOssForCausalLM", Affects.QUANTIZED,
        "the int8 and int4 builds read the original MXFP4 expert tensors "
        "(gate_up_proj_blocks), which a bf16 or fp32 checkpoint does not have",
        lambda config: "quantization_config" not in config,
    ),
)  # fmt: skip


def known_differences(config: dict[str, Any]) -> list[KnownDifference]:
    """The known differences that apply to a model with this config.json."""
    architecture = (config.get("architectures") or [""])[0]
    return [
        known
        for known in KNOWN_DIFFERENCES
        if known.architecture == architecture and known.applies(config)
    ]
