"""Where main's child runs execute besides local processes: Kubernetes Jobs through MLflow's
backend. Imports config, tracking.provenance and errors."""
