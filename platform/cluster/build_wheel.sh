#!/usr/bin/env bash
# Build the hidrop wheel from a clean copy of the checkout: its tracked files and the untracked ones git does
# not ignore, so no build/, *.egg-info, runs or caches from this tree end up in the wheel, and the tree
# itself gets no build artifacts. `make wheel` runs it; so does tests/test_wheel.py.
#   platform/cluster/build_wheel.sh [OUTDIR]      (default dist/; prints the wheel's path)
# PYTHON picks the interpreter whose setuptools builds it (default: the project's .venv), offline.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:-$ROOT/dist}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT

cd "$ROOT"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -e "$f" ]; then printf '%s\0' "$f"; fi  # a tracked file deleted in the work tree stays out
done | xargs -0 -r cp -P --parents -t "$SRC"

rm -f "$OUT"/hidrop-*.whl  # one wheel in OUTDIR: the Dockerfile copies dist/hidrop-*.whl
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir "$OUT" "$SRC" >&2
ls "$OUT"/hidrop-*.whl
