#!/usr/bin/env bash
# Submit a hidrop command to an existing Ray cluster as a Ray job (a cluster started with `ray start` /
# `ray up`, or a KubeRay RayCluster whose dashboard is port-forwarded to localhost:8265). Usage:
#   platform/cluster/submit.sh experiments/llava15_7b_hidrop_finetune.yaml \
#       train.storage_path=/shared/runs tracking.uri=http://mlflow:5000 [a.b=c ...]
#   HIDROP_COMMAND=tune platform/cluster/submit.sh experiments/llava15_7b_search.yaml tune.storage_path=/shared/tune ...
# RAY_ADDRESS is the dashboard (job server) address. The nodes run the hidrop installed on them (the
# image); the uploaded working dir carries only your experiment files and data, so the code directories
# are left out. Ray deletes that working dir after the job: storage paths must be absolute paths on
# storage every node shares, and tracking.uri an MLflow server (hidrop refuses otherwise).
set -euo pipefail
EXPERIMENT=${1:?usage: submit.sh EXPERIMENT.yaml [overrides...]}
shift
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
COMMAND=${HIDROP_COMMAND:-train}
EXCLUDES='[".git", ".venv", "runs", "mlruns", "reports", "dist", "build", "hidrop", "platform", "dashboards", "tests"]'
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"HF_HUB_OFFLINE\": \"1\"}, \"excludes\": $EXCLUDES}" \
  -- hidrop "$COMMAND" "$EXPERIMENT" "$@"
