"""The bytes one decode step reads, per model format, for the memory-bandwidth bound.

A decode step multiplies one token's activations by every matmul weight, at the precision the
weight is stored in, so all of those bytes are read once per token. An embedding table is read
one row per token, unless the same table is also the output projection (tied embeddings), in
which case the projection reads all of it. Rotary caches are read one row per token. The KV
cache is read whole: keys and values of every layer for every position so far. File sizes
are not this number: they hold the embedding table whole, and quantization scales beside the
weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GATHERS = {"Gather", "GatherBlockQuantized"}
ROW_READERS = GATHERS | {"GroupQueryAttention"}  # rotary cos/sin caches: one row per position


@dataclass(frozen=True)
class DecodeBytes:
    weights: int  # read whole every step
    rows: int  # embedding and rotary rows read every step
    kv_per_position: int  # KV-cache bytes per position already in the cache

    def at(self, positions: int) -> int:
        """Bytes read by the step that follows `positions` cached positions."""
        return self.weights + self.rows + self.kv_per_position * positions


def onnx_decode_bytes(folder: Path) -> DecodeBytes:
    """From the graph of an onnxruntime-genai export: initializers by the ops that read them,
    and the KV-cache inputs' shapes and types from genai_config.json and the graph."""
    import onnx

    config = json.loads((folder / "genai_config.json").read_text())["model"]
    graph = onnx.load(folder / config["decoder"]["filename"], load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    weights = rows = 0
    for tensor in graph.initializer:
        size = int(np.prod(tensor.dims)) * _itemsize(tensor.data_type)
        if readers.get(tensor.name, set()) <= ROW_READERS and tensor.dims:
            rows += size // tensor.dims[0]
        else:
            weights += size
    past = [x for x in graph.input if x.name.startswith("past_key_values.")]
    kv = 0
    for cache in past:
        dims = [d.dim_value for d in cache.type.tensor_type.shape.dim]
        heads, head_size = dims[1], dims[3] or config["decoder"]["head_size"]
        kv += heads * head_size * _itemsize(cache.type.tensor_type.elem_type)
    return DecodeBytes(weights, rows, kv)


def _itemsize(onnx_type: int) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    return np.dtype(tensor_dtype_to_np_dtype(onnx_type)).itemsize


def safetensors_decode_bytes(folder: Path) -> DecodeBytes:
    """From a transformers checkpoint's safetensors headers and config.json (KV cache in the
    checkpoint's dtype)."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    weights = rows = 0
    itemsize = 4
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = tensors.get_slice(name)
                shape = tensor.get_shape()
                itemsize = np.dtype(_SAFETENSORS_DTYPES[tensor.get_dtype()]).itemsize
                size = int(np.prod(shape)) * itemsize
                if name.endswith("embed_tokens.weight"):
                    rows += size // shape[0]
                    if config.get("tie_word_embeddings"):
                        weights += size  # the output projection reads the whole table
                else:
                    weights += size
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    kv = 2 * config["num_hidden_layers"] * kv_heads * head_size * itemsize
    return DecodeBytes(weights, rows, kv)


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "uint16", "I64": "int64"}


def gguf_decode_bytes(path: Path, kv_itemsize: int = 2) -> DecodeBytes:
    """From a GGUF file's tensor table (each tensor's stored bytes, quantization blocks
    included) and its llama.* metadata; llama.cpp keeps the KV cache in f16 by default. Without
    an `output.weight`, the token embedding table is also the output projection."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key: str) -> int:
        found = reader.fields[key]
        return int(found.parts[found.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tensors = {t.name: t for t in reader.tensors}
    embedding = tensors["token_embd.weight"]
    tied = "output.weight" not in tensors
    weights = sum(int(t.n_bytes) for name, t in tensors.items() if name != "token_embd.weight")
    rows = int(embedding.n_bytes) // int(embedding.shape[-1])
    if tied:
        weights += int(embedding.n_bytes)
    head_size = field(f"{arch}.embedding_length") // field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv")
    kv = 2 * field(f"{arch}.block_count") * kv_heads * head_size * kv_itemsize
    return DecodeBytes(weights, rows, kv)
