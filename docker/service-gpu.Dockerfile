# TreePO rollout service beside SGLang: the SGLang image (CUDA torch, sglang) plus treepo-service.
# The same image runs `python3 -m sglang.launch_server ...` (the GPU worker) and `treepo serve --engine sglang`.
# Build from the repository root: docker build -f docker/service-gpu.Dockerfile -t treepo/service-gpu .
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.4
FROM ${SGLANG_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/treepo
COPY client/ client/
COPY service/ service/
# torch comes with the SGLang image (it satisfies treepo-service's torch>=2.4): nothing CUDA is reinstalled.
RUN python3 -m pip install --no-cache-dir "./client[redis]" ./service \
    && useradd --create-home --uid 10001 treepo \
    && mkdir -p /data/weights \
    && chown treepo /data/weights

USER 10001
ENV TREEPO_HOST=0.0.0.0 \
    TREEPO_PORT=8000 \
    TREEPO_ENGINE=sglang \
    TREEPO_WEIGHTS_DIR=/data/weights
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["treepo", "serve"]
