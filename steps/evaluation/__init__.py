"""Evaluation: the versioned set, fidelity scoring against the reference, asking logged models,
the choice rules, and the summaries, tables and charts. Imports steps.config and steps.errors
(and MLflow to load models)."""
