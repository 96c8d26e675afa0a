#!/usr/bin/env bash
# `make gpu-check`: every GPU figure in one run (hidrop_platform/bench/gpu_check.py), straight from the tree,
# with whichever python3 holds torch: the project's .venv here, the machine's own on a bare GPU box.
# Wheels in .whl/ (`make gpu-wheels` fetches them where pip works) are installed first into a scratch
# folder; no registry is needed. Arguments go to gpu_check (--device cpu --tiny: the dry run).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# the wheels are built for the GPU machine's CPython 3.12 (`make gpu-wheels`); another interpreter skips them
if compgen -G "$root/.whl/*.whl" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$scratch/site" "$root"/.whl/*.whl
    export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# without an install, the two packages are importable through links (platform/ is hidrop_platform)
mkdir -p "$scratch/src"
ln -s "$root/hidrop" "$scratch/src/hidrop"
ln -s "$root/platform" "$scratch/src/hidrop_platform"
export PYTHONPATH="$scratch/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$root"
"$py" -m hidrop_platform.bench.gpu_check "$@"
