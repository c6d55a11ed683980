"""What a logged model serves and how it is served: the chat schema, the ONNX chat model that
ships inside the model (models-from-code: imports nothing of ours) and model-server processes.
Imports nothing else of this project."""
