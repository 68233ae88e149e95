# One image for every afif process: `afif api`, `afif worker`, `afif migrate`,
# `afif reconcile` (the command is the container's CMD; see docker-compose.yml).
#
# torch is pinned to the version the test suite runs (2.13.0; tests/test_deploy_files.py
# checks that the two agree). PyPI's Linux x86_64 torch wheel is the CUDA build: the CUDA
# runtime, cuBLAS and cuDNN come along as nvidia-* wheels, so the base needs only the
# Python we test (3.11); GPU hosts need the NVIDIA driver and container toolkit, and on a
# host without GPUs the same image's workers use the CPU. torch goes in first, so the
# project's `torch>=2.4` is already met and pip leaves the pinned build alone.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    AFIF_DATA_DIR=/data

WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}"
COPY . /app
RUN pip install '.[postgres,tables]' \
    && python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" \
    && useradd --create-home --uid 1000 afif \
    && mkdir -p /data \
    && chown afif /data

USER afif
VOLUME ["/data"]
EXPOSE 8000

# Probes the API only; docker-compose.yml turns it off for the processes that serve no HTTP.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["afif"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
