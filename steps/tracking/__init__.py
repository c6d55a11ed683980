"""MLflow glue: the run of a step and what it records (params, tags, provenance), which earlier
runs feed or replace a step, the run pages and model cards, and the Model Registry. Imports
config, store, sources, evaluation and errors."""
