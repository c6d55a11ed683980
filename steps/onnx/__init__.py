"""ONNX builds of a snapshot with onnxruntime-genai's model builder, cached in the store. Imports
steps.config, steps.store and steps.errors."""
