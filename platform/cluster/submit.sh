#!/usr/bin/env bash
# Submit a training run to an existing Ray cluster (e.g. one started with `ray up`, or a KubeRay
# RayCluster whose dashboard is port-forwarded to localhost:8265). Usage:
#   platform/cluster/submit.sh experiments/llava15_7b_hidrop_finetune.yaml [a.b=c ...]
set -euo pipefail
EXPERIMENT=${1:?usage: submit.sh EXPERIMENT.yaml [overrides...]}
shift
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": [".venv", "runs", "mlruns"]}' \
  -- hidrop train "$EXPERIMENT" "$@"
