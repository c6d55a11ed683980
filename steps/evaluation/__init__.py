"""Evaluation: the versioned set, asking logged models, and the summaries, table and chart.
Imports steps.errors only (and MLflow to load models)."""
