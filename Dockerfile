# One image for the API, the worker and the migrations: `lethe api | worker | migrate` (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LETHE_API_HOST=0.0.0.0 \
    LETHE_API_PORT=8000 \
    LETHE_STORAGE_URL=/data/store \
    LETHE_CACHE_DIR=/data/cache \
    LETHE_DATA_DIR=/data/inputs

WORKDIR /app

# torch pinned. PyPI's Linux x86_64 wheel is the CUDA build (the worker runs on a GPU; the same wheel falls
# back to the CPU); set TORCH_INDEX_URL to take it from another index (e.g. a CPU-only one for an API-only
# image). Its own layer: it is by far the largest and changes least often.
ARG TORCH_INDEX_URL=""
RUN pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install ".[worker]"

# Non-root. /data: the inputs a request may name by path, and the object store when it is a local directory
# (one machine). Across machines LETHE_STORAGE_URL names a bucket (docker-compose.yml) and nothing is shared.
RUN useradd --create-home --uid 10001 lethe && mkdir -p /data && chown lethe:lethe /data
USER lethe
VOLUME ["/data"]
EXPOSE 8000

# The API's readiness (database at the migration head, broker, store; no token needed). The worker's service
# overrides it in docker-compose.yml.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['LETHE_API_PORT'] + '/readyz', timeout=4)"

CMD ["lethe", "api"]
