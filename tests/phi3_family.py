"""Small checkpoints with the Phi-3 family's architectures, made offline from a fixed seed.

The real weights (7.6 GB) cannot be reached from CI, the architecture can: each `Phi3Variant`
carries the `config.json` fields of its real model (`Phi3ForCausalLM`, the vocabulary layout
with the chat tokens at 32000-32010, bos/eos/pad ids, sliding window, untied embeddings, and
LongRoPE's `rope_scaling` for 128k and 3.5), scaled down to a few layers and a small hidden
size, with our own values for the rope factors. `original_max_position_embeddings` is small on
the LongRoPE variants so that an ordinary prompt crosses it and the long factors run.

The tokenizer is of Phi-3's kind, built here with `tokenizers`: a Llama-style BPE over
SentencePiece pieces (`▁` for spaces, byte fallback, `<unk>`/`<s>`/`</s>` at 0-2), trained on
the project's own evaluation texts and padded to 32000 pieces, then Phi-3's added tokens with
their flags (special, and `rstrip` on the role and end tokens) and the variant's chat template.

A random model rarely ends a turn by itself, so the stop path is forced: `<|end|>`'s and
`<|endoftext|>`'s output rows copy, slightly scaled up, the rows of tokens the model emits
early on fixed prompts (`STOP_AT_END`, `STOP_AT_ENDOFTEXT`). Wherever the model would emit such
a token it ends the turn instead, in both runtimes alike.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.config.compose import CONF_DIR, compose_config
from steps.config.schema import ModelConfig, PrebuiltOnnx

SEED = 20260425
REAL_PIECES = 32000  # Llama's SentencePiece vocabulary; Phi-3's own tokens follow it
VOCAB_SIZE = 32064  # the embedding rows of every Phi-3 mini (padded past the last token)
BOS = 1
# Phi-3's added tokens: id -> (content, rstrip).
ADDED_TOKENS = {
    32000: ("<|endoftext|>", False),
    32001: ("<|assistant|>", True),
    32002: ("<|placeholder1|>", True),
    32003: ("<|placeholder2|>", True),
    32004: ("<|placeholder3|>", True),
    32005: ("<|placeholder4|>", True),
    32006: ("<|system|>", True),
    32007: ("<|end|>", True),
    32008: ("<|placeholder5|>", True),
    32009: ("<|placeholder6|>", True),
    32010: ("<|user|>", True),
}
ENDOFTEXT, SYSTEM, END = 32000, 32006, 32007
ROLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system'SYSTEM_CONDITION %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Prompts whose greedy continuations decide the forced stops (see the module docstring).
STOP_AT_END = [{"role": "user", "content": "Say something short."}]
STOP_AT_ENDOFTEXT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
]
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 64, 2, 4, 128


@dataclass(frozen=True)
class Phi3Variant:
    """What differs between the family's checkpoints (the rest is common to all three)."""

    name: str  # the conf/model option, whose pins the loopback Hub serves
    max_position_embeddings: int
    original_max_position_embeddings: int
    sliding_window: int
    model_max_length: int
    generation_eos: tuple[int, ...]
    # The 3.5 template leaves out an empty system message; 4k and 128k print it.
    system_condition: str = ""
    longrope: bool = field(init=False)

    def __post_init__(self) -> None:
        longrope = self.max_position_embeddings != self.original_max_position_embeddings
        object.__setattr__(self, "longrope", longrope)

    @property
    def pins(self) -> ModelConfig:
        """The variant's shipped config: its weights' and its exports' repos and commits."""
        return _shipped(self.name)

    @property
    def repo_id(self) -> str:
        return self.pins.source.repo_id

    @property
    def revision(self) -> str:
        return self.pins.source.revision

    @property
    def cpu_export(self) -> PrebuiltOnnx:
        return self.pins.prebuilt_onnx["cpu"]

    @property
    def chat_template(self) -> str:
        return ROLE_TEMPLATE.replace("SYSTEM_CONDITION", self.system_condition)


VARIANTS = {
    v.name: v
    for v in (
        Phi3Variant(
            name="phi3-mini-4k",
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            sliding_window=2047,
            model_max_length=4096,
            generation_eos=(32000, 32001, 32007),
        ),
        Phi3Variant(
            name="phi3-mini-128k",
            # The real 4096 -> 131072 (x32), scaled so that prompts cross the original length.
            max_position_embeddings=2048,
            original_max_position_embeddings=64,
            sliding_window=262144,
            model_max_length=131072,
            generation_eos=(32000, 32001, 32007),
        ),
        Phi3Variant(
            name="phi3.5-mini",
            max_position_embeddings=2048,
            original_max_position_embeddings=64,
            sliding_window=262144,
            model_max_length=131072,
            generation_eos=(32007, 32001, 32000),
            system_condition=" and message['content']",
        ),
    )
}


@functools.cache
def _shipped(name: str) -> ModelConfig:
    return compose_config([f"model={name}"]).model


def config_json(variant: Phi3Variant) -> dict[str, Any]:
    """The real model's config.json fields, scaled down."""
    config: dict[str, Any] = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "embd_pdrop": 0.0,
        "eos_token_id": ENDOFTEXT,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": variant.max_position_embeddings,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "original_max_position_embeddings": variant.original_max_position_embeddings,
        "pad_token_id": ENDOFTEXT,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": variant.sliding_window,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    if variant.longrope:
        half_head = HIDDEN // HEADS // 2
        config["rope_scaling"] = {
            "type": "longrope",
            # Our own factors, shaped like the real ones: near 1 for short, growing for long.
            "short_factor": [1.0 + 0.02 * i for i in range(half_head)],
            "long_factor": [1.0 + 1.5 * i**1.5 for i in range(half_head)],
        }
    return config


def _training_text() -> list[str]:
    """The project's own evaluation texts: what the tokenizer will mostly be asked to encode."""
    lines = []
    for path in sorted((CONF_DIR / "evaluate").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            lines += [str(v) for v in json.loads(line).values() if isinstance(v, str)]
    return lines


def tokenizer_json() -> dict[str, Any]:
    """A Llama-style byte-fallback BPE with Phi-3's vocabulary layout and added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Pieces never cross a space, a script boundary or a digit (SentencePiece's defaults with
    # Llama's split_digits), so the vocabulary holds only pieces a real Llama one could; the
    # saved tokenizer then encodes the whole normalized text, as Llama's tokenizer.json does.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.UnicodeScripts(),
        pre_tokenizers.Digits(individual_digits=True),
    ])  # fmt: skip
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<unk>", "<s>", "</s>", *byte_pieces],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    # Unreachable pieces (no merge makes them) fill the vocabulary up to Llama's 32000.
    for filler in range(len(vocab), REAL_PIECES):
        vocab[f"▁unused{filler}"] = filler
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]}  # fmt: skip
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}  # fmt: skip
    spec["added_tokens"] = [
        _added(i, text, special=True, rstrip=False) for i, text in ((0, "<unk>"), (1, "<s>"))
    ] + [_added(2, "</s>", special=False, rstrip=True)]
    spec["added_tokens"] += [
        _added(i, text, special=True, rstrip=rstrip) for i, (text, rstrip) in ADDED_TOKENS.items()
    ]
    return spec


def _added(token_id: int, content: str, special: bool, rstrip: bool) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": rstrip, "normalized": False, "special": special}  # fmt: skip


def tokenizer_config(variant: Phi3Variant, added: list[dict[str, Any]]) -> dict[str, Any]:
    flags = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    decoder = {str(t["id"]): {k: t[k] for k in flags} for t in added}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "chat_template": variant.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": variant.model_max_length,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


LICENSE = """Test checkpoint with the architecture of {display}; random weights, no training.
Made by tests/phi3_family.py of this repository (MIT, like the real model).
"""


def write_checkpoint(variant: Phi3Variant, folder: Path) -> Path:
    """The file set the real repo publishes (without tokenizer.model), with random weights from
    a fixed seed and the forced stops."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    spec = tokenizer_json()
    _dump(folder / "tokenizer.json", spec)
    _dump(folder / "tokenizer_config.json", tokenizer_config(variant, spec["added_tokens"]))
    _dump(
        folder / "special_tokens_map.json",
        {name: {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}
         for name, content in (("bos_token", "<s>"), ("eos_token", "<|endoftext|>"),
                               ("pad_token", "<|endoftext|>"), ("unk_token", "<unk>"))},
    )  # fmt: skip
    _dump(folder / "added_tokens.json", {text: i for i, (text, _) in ADDED_TOKENS.items()})
    _dump(folder / "config.json", config_json(variant))
    _dump(
        folder / "generation_config.json",
        {"bos_token_id": BOS, "eos_token_id": list(variant.generation_eos),
         "pad_token_id": ENDOFTEXT, "do_sample": False},
    )  # fmt: skip
    (folder / "LICENSE").write_text(LICENSE.format(display=variant.repo_id))

    torch.manual_seed(SEED)
    model = Phi3ForCausalLM(Phi3Config.from_pretrained(folder)).eval()
    with torch.no_grad():
        # Wider logit gaps than the 0.02 init gives, so float rounding never flips a greedy pick.
        model.lm_head.weight.mul_(25.0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _force_stop(model, tokenizer, END, STOP_AT_END)
    _force_stop(model, tokenizer, ENDOFTEXT, STOP_AT_ENDOFTEXT)
    # The weights alone: save_pretrained would rewrite the published configs in its own shape.
    save_file(model.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _force_stop(model: Any, tokenizer: Any, end_id: int, messages: list[dict[str, str]]) -> None:
    """Make `end_id` win wherever the model would emit the third distinct token it emits on
    `messages`, so a greedy answer there ends after a few tokens."""
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
    generated = out[0, ids.shape[1] :].tolist()
    seen: list[int] = []
    for token in generated:
        if token not in seen:
            seen.append(token)
    if len(seen) < 3:
        raise RuntimeError(f"the random model repeats itself on {messages}: pick another seed")
    with torch.no_grad():
        model.lm_head.weight[end_id] = model.lm_head.weight[seen[2]] * 1.05


def _dump(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
