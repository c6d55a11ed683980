"""The chat schema both runtimes serve: MLflow's `llm/v1/chat` (OpenAI Chat Completions shape),
the signature the ONNX model declares, the input example both logged models carry, and the
modules that ship inside the ONNX model beside its models-from-code file."""

from __future__ import annotations

from pathlib import Path

from mlflow.models import ModelSignature
from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA
from mlflow.types.schema import ColSpec, DataType, Schema

# Logged as the ONNX model's `code_paths`: MLflow copies them into the model and puts them on
# `sys.path` before it runs the model file (onnx_chat_model.py), which imports them by these
# file names. Standard library, numpy, onnxruntime-genai and mlflow only (tests/test_layout.py).
ONNX_CODE_PATHS = tuple(
    Path(__file__).resolve().parent / name for name in ("chat_protocol.py", "onnx_engine.py")
)
CHAT_EXAMPLE = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 32,
}


def chat_signature() -> ModelSignature:
    """MLflow's llm/v1/chat signature (what the transformers flavor logs), with `messages`
    optional and a legacy `prompt` column, so one model serves both forms."""
    columns = [
        ColSpec(c.type, c.name, required=False) if c.name == "messages" else c
        for c in CHAT_MODEL_INPUT_SCHEMA.inputs
    ]
    columns.append(ColSpec(DataType.string, "prompt", required=False))
    return ModelSignature(inputs=Schema(columns), outputs=CHAT_MODEL_OUTPUT_SCHEMA)
