"""Typed configuration: the schemas behind conf/, the one compose/validate point, ONNX build
specs, and the plan (what a config will run). Imports only steps.errors."""
