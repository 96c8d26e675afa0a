"""MLflow tracking: the names of everything logged, the store, the run tracker, the offline spool, the UI."""
