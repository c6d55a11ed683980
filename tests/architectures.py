"""Tiny checkpoints of every text-only decoder architecture both runtimes build, made offline.

The list comes from the installed packages, not from this file: the architectures the
onnxruntime-genai builder dispatches on (`steps.onnx.build.supported_architectures`) that
transformers ships as causal language models without remote code, less the multimodal wrappers
(`*ForConditionalGeneration`). `FEATURES` switches on, per architecture, what sets it apart
from Llama (sliding windows shorter than the parity prompt, logit soft-capping, QK-norm,
partial rotary, rope scaling, multipliers, tied or untied embeddings, expert and hybrid
layers); an architecture a new pin adds and this table lacks is built with its transformers
defaults at the tiny size, so it is tested rather than skipped.

Every checkpoint carries the bundled SmolLM2's tokenizer and chat template (a byte-level BPE
that both runtimes tokenize alike, and ChatML), a few layers of small width and weights from a
fixed seed, its output rows scaled up so that float rounding never flips a greedy pick.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.onnx.known_differences import Affects, known_differences

SEED = 20261204
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# SmolLM2's vocabulary and its ChatML ids (<|im_start|>, <|im_end|>).
VOCAB_SIZE, BOS, EOS = 49152, 1, 2
SLIDING_WINDOW = 16  # shorter than the parity prompt, so every windowed layer slides
TINY = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": EOS,
    "torch_dtype": "float32",
    # Layers that outweigh the residual stream: at 0.02 a tied model echoes its last input token.
    "initializer_range": 0.3,
}
ALTERNATING = ["sliding_attention", "full_attention"]
# Rotary on half of each head: onnxruntime's rotary cache wants a multiple of 8 dimensions, so
# the heads are 32 wide (16 rotated) where the others are 16.
HALF_ROTARY = {
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "partial_rotary_factor": 0.5,
}
# Gemma scales its embeddings by sqrt(hidden): wider layers keep its greedy tokens varied.
GEMMA_INIT = 1.0


@dataclass(frozen=True)
class Architecture:
    """One row of the matrix: the transformers class, its model_type and what is switched on."""

    name: str  # config.json's architectures[0]
    model_type: str
    features: str  # in words, for the docs table
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def fp32_differs(self) -> str:
        """Why the fp32 build is known not to match transformers ("" where it should)."""
        return _says(self, {Affects.NO_BUILD, Affects.LONG_PROMPTS, Affects.FP32})

    @property
    def int8_differs(self) -> str:
        """Why the int8 build is known not to build or run on the parity prompt."""
        return _says(self, {Affects.NO_BUILD, Affects.LONG_PROMPTS, Affects.QUANTIZED})


def _says(architecture: Architecture, affects: set[Affects]) -> str:
    found = known_differences(config_json(architecture))
    return "; ".join(known.says for known in found if known.affects in affects)


FEATURES = {
    a.name: a
    for a in (
        Architecture(
            "LlamaForCausalLM", "llama", "llama3 rope scaling, tied embeddings",
            {"tie_word_embeddings": True, "rope_theta": 10000.0, "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}},
        ),
        Architecture(
            "MistralForCausalLM", "mistral", "sliding window on every layer, untied",
            {"sliding_window": SLIDING_WINDOW, "tie_word_embeddings": False},
        ),
        Architecture(
            "Qwen2ForCausalLM", "qwen2", "QKV bias, sliding window on the upper layer, tied",
            {"tie_word_embeddings": True, "use_sliding_window": True,
             "sliding_window": SLIDING_WINDOW, "max_window_layers": 1},
        ),
        Architecture(
            "Qwen3ForCausalLM", "qwen3", "QK-norm, untied",
            {"tie_word_embeddings": False},
        ),
        Architecture(
            "GemmaForCausalLM", "gemma", "scaled embeddings, GeLU, (1 + w) norms, tied",
            {"tie_word_embeddings": True, "initializer_range": GEMMA_INIT},
        ),
        Architecture(
            "Gemma2ForCausalLM", "gemma2",
            "attention and final logit soft-capping, alternating sliding window, tied",
            {"sliding_window": SLIDING_WINDOW, "layer_types": ALTERNATING,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
             "query_pre_attn_scalar": 16, "initializer_range": GEMMA_INIT},
        ),
        Architecture(
            "Gemma3ForCausalLM", "gemma3_text",
            "QK-norm, alternating sliding window with its own rope base, tied",
            {"sliding_window": SLIDING_WINDOW, "layer_types": ALTERNATING,
             "query_pre_attn_scalar": 16, "initializer_range": GEMMA_INIT,
             "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None},
        ),
        Architecture(
            "PhiForCausalLM", "phi", "partial rotary (half the head), LayerNorm, biases, untied",
            {"tie_word_embeddings": False, **HALF_ROTARY},
        ),
        Architecture(
            "Phi3ForCausalLM", "phi3", "LongRoPE scaling past a short original context, untied",
            {"tie_word_embeddings": False, "max_position_embeddings": 2048,
             "original_max_position_embeddings": 32, "rope_theta": 10000.0, "rope_scaling": {
                 "type": "longrope",
                 "short_factor": [1.0 + 0.02 * i for i in range(8)],
                 "long_factor": [1.0 + 1.5 * i**1.5 for i in range(8)]}},
        ),
        Architecture(
            "GraniteForCausalLM", "granite",
            "embedding, residual, attention and logit multipliers, tied",
            {"tie_word_embeddings": True, "embedding_multiplier": 2.0,
             "residual_multiplier": 0.5, "attention_multiplier": 0.125,
             "logits_scaling": 2.0},
        ),
        Architecture(
            "OlmoForCausalLM", "olmo", "non-parametric LayerNorm, untied",
            {"tie_word_embeddings": False},
        ),
        Architecture(
            "NemotronForCausalLM", "nemotron", "partial rotary, squared ReLU, LayerNorm1P",
            {"tie_word_embeddings": False, **HALF_ROTARY},
        ),
        Architecture(
            "SmolLM3ForCausalLM", "smollm3", "no rope on every other layer, tied",
            {"no_rope_layer_interval": 2, "tie_word_embeddings": True},
        ),
        Architecture(
            "Ernie4_5ForCausalLM", "ernie4_5", "tied embeddings, interleaved rope",
            {"tie_word_embeddings": True},
        ),
        Architecture(
            "HunYuanDenseV1ForCausalLM", "hunyuan_v1_dense", "QK-norm, untied",
            {"tie_word_embeddings": False},
        ),
        Architecture(
            "GptOssForCausalLM", "gpt_oss",
            "mixture of experts, attention sinks, alternating sliding window, YaRN",
            {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": SLIDING_WINDOW,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
             "layer_types": ALTERNATING, "rope_theta": 150000.0, "rope_scaling": {
                 "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}},
        ),
        Architecture(
            "Lfm2ForCausalLM", "lfm2", "short convolution layers beside attention, tied",
            {"layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False},
        ),
        Architecture(
            "Lfm2MoeForCausalLM", "lfm2_moe", "convolution layers, mixture of experts",
            {"layer_types": ["conv", "full_attention"], "num_experts": 4,
             "num_experts_per_tok": 2, "num_dense_layers": 1, "moe_intermediate_size": 32},
        ),
        Architecture(
            "GraniteMoeHybridForCausalLM", "granitemoehybrid",
            "mixture of experts beside a shared MLP, attention layers only",
            {"layer_types": ["attention", "attention"], "num_local_experts": 4,
             "num_experts_per_tok": 2, "mamba_n_heads": 4, "mamba_d_head": 32,
             "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16},
        ),
    )
}  # fmt: skip


def matrix() -> list[Architecture]:
    """Every text-only decoder architecture the installed builder and transformers both build."""
    from steps.add_model import causal_lm_architectures
    from steps.onnx.build import supported_architectures

    both = supported_architectures() & causal_lm_architectures()
    return [
        FEATURES.get(name) or Architecture(name, _model_type(name), "transformers' defaults")
        for name in sorted(both)
        if name.endswith("ForCausalLM")
    ]


def _model_type(architecture: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = [t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == architecture]
    stem = architecture.removesuffix("ForCausalLM").lower()
    return next((t for t in types if t.replace("_", "") == stem), types[0])


def config_json(architecture: Architecture) -> dict[str, Any]:
    """The architecture's config at the tiny size, with its features on."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(architecture.model_type, **TINY).to_dict()
    if "rope_scaling" in architecture.config or "rope_theta" in architecture.config:
        # Rope settings in the form published checkpoints write them (and the builder reads).
        config.pop("rope_parameters", None)
    config |= architecture.config
    config["architectures"] = [architecture.name]
    return config


def write_checkpoint(architecture: Architecture, tokenizer_dir: Path, folder: Path) -> Path:
    """An HF-format folder: config.json, random weights from the fixed seed, SmolLM2's
    tokenizer and chat template."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, folder / name)
    (folder / "config.json").write_text(json.dumps(config_json(architecture), indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS}) + "\n"
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).eval()
    with torch.no_grad():
        # Wider logit gaps than the 0.02 init gives (tied models: the shared table, whose
        # inputs the first norm scales back).
        model.get_output_embeddings().weight.mul_(5.0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def build(checkpoint: Path, output: Path, precision: str) -> Path:
    """The ONNX folder the pipeline's build makes of `checkpoint` at `precision` on CPU: the
    project's own builder command line (steps.onnx.build.builder_command), run inside this
    process. A process per build would spend most of its seconds importing torch again."""
    import contextlib
    import io
    import os
    import runpy
    import sys

    from steps.onnx.build import build_inputs, builder_command

    inputs = build_inputs(f"parity-{checkpoint.name}", precision, "cpu", {})
    command = builder_command(checkpoint, output, output.parent / "builder-cache", inputs)
    module = command.index("-m") + 1
    argv, git_dir = sys.argv, os.environ.get("GIT_DIR")
    # As steps.onnx.build runs it: no git commit of ours stamped into the model.
    os.environ["GIT_DIR"] = os.devnull
    sys.argv = [command[module], *command[module + 1 :]]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module(command[module], run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
        if git_dir is None:
            os.environ.pop("GIT_DIR", None)
        else:
            os.environ["GIT_DIR"] = git_dir
    return output
