"""The pipeline: one module per MLproject entry point (fetch, wrap_transformers, wrap_onnx,
evaluate, register, main), each a `run(cfg, ...) -> Result` and a thin `main(cfg)`, on top of
sub-packages by concern that import only the layers below them (tests/test_layout.py)."""
