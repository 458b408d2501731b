# TreePO trainer: pulls trees from Redis, trains, pushes weights to the service.
# Build from the repository root: docker build -f docker/trainer.Dockerfile -t treepo/trainer .
# CPU by default. For CUDA (compose profile gpu), build with --build-arg TORCH_INDEX_URL=https://pypi.org/simple:
# PyPI's Linux torch wheel is the CUDA build and carries its CUDA libraries; run with --device cuda.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/treepo
COPY client/ client/
COPY service/ service/
COPY trainer/ trainer/
RUN pip install --no-cache-dir "./client[redis]" ./service ./trainer \
    && useradd --create-home --uid 10001 treepo \
    && mkdir -p /data/weights /data/runs \
    && chown treepo /data/weights /data/runs

USER 10001
WORKDIR /data/runs
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
ENTRYPOINT ["treepo", "train"]
CMD ["--metrics-port", "9100", "--output-dir", "/data/runs/train", "--weights-dir", "/data/weights"]
