"""MLflow tracking: `names` (everything logged), `store` (the store: URIs, checks, experiments, reading
back), `tracker` (one run, spooled while offline), `spool_file` and `spool` (the offline spool and replaying
what was left), `params` (system metrics, versions, schedule params), `ui` (the MLflow UI)."""
