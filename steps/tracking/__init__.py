"""MLflow glue: the run of a step and what it records (params, tags, provenance), which
upstream runs feed a step, and the Model Registry. Imports config, store, sources and errors."""
