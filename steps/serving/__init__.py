"""Serving a logged chat model.

- chat.py: the chat schema both logged models declare, their input example, and what ships
  with the ONNX model beside its model file.
- chat_protocol.py: the serving rules, once: request checks, sampling defaults, the context
  window, the stop-string hold-back, answer and chunk shapes, `usage` (standard library only;
  it ships inside the ONNX model).
- onnx_chat_model.py: the ONNX model's models-from-code pyfunc; onnx_engine.py: its batching
  `og.Engine` loop (ships with it too).
- served_models.py: a logged model of either runtime, loaded for the OpenAI-compatible server;
  openai_api.py: that server's routes; follow.py: the version it serves, following an alias.
- processes.py: model servers as child processes on loopback ports (tests, bench).

What ships inside the ONNX model imports nothing of this project (tests/test_layout.py); the
rest imports only the layers below serving.
"""
