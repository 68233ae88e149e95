# One image for every afif process: `afif api`, `afif worker`, `afif migrate`,
# `afif reconcile` (the command is the container's CMD; see docker-compose.yml).
# The base ships CUDA and a matching torch, so pip keeps that torch (pyproject asks for
# torch>=2.4) and installs only the rest; on a host without GPUs the workers use the CPU.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    AFIF_DATA_DIR=/data

WORKDIR /app
COPY . /app
RUN pip install '.[postgres,tables]' \
    && useradd --create-home --uid 1000 afif \
    && mkdir -p /data \
    && chown afif /data

USER afif
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["afif"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
