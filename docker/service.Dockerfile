# TreePO rollout service: one image for both engines. TREEPO_ENGINE=embedded samples in-process on CPU (the
# shipped tiny model); TREEPO_ENGINE=sglang talks HTTP to SGLang workers that run the stock lmsysorg/sglang
# image, unchanged (installing this package into SGLang's image replaced its transformers and broke RoPE).
# Build from the repository root: docker build -f docker/service.Dockerfile -t treepo/service .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU wheel of torch first: an unpinned torch from PyPI pulls a multi-GB CUDA build. With SGLang the service
# never runs the model itself (tokenizer and config only), so the CPU wheel serves both engines.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/treepo
COPY client/ client/
COPY service/ service/
RUN pip install --no-cache-dir "./client[redis]" ./service \
    && useradd --create-home --uid 10001 treepo \
    && mkdir -p /data/weights \
    && chown treepo /data/weights

USER 10001
ENV TREEPO_HOST=0.0.0.0 \
    TREEPO_PORT=8000 \
    TREEPO_ENGINE=embedded \
    TREEPO_WEIGHTS_DIR=/data/weights
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["treepo", "serve"]
