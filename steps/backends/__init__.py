"""Where main's child runs execute: local `mlflow run` processes or Kubernetes Jobs through
MLflow's backend, started and waited for in one place (launch). Imports config, tracking and
errors."""
