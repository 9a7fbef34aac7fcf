# backdoor-scan: the API and the scan workers in one image (docs/containers.md).
#
#   docker build -t backdoor-scan:cpu .                                   # PyPI's torch (see TORCH_INDEX_URL)
#   docker build -t backdoor-scan:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker build -t backdoor-scan:cuda --build-arg TORCH_VARIANT=cuda .
#
# Default command: the API alone (`serve --workers 0`); run workers from the same image with
# `backdoor-scan worker [--device cuda:0]`. Settings are BDS_* environment variables (README.md).

ARG PYTHON_IMAGE=python:3.11-slim

# --- requirements: the runtime dependencies listed in pyproject.toml (no dev extras) -------------------
# a stage of its own so that edits to pyproject.toml's tool settings do not invalidate the install below
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt

# --- deps: a virtual environment with torch and the other dependencies --------------------------------
FROM ${PYTHON_IMAGE} AS deps

# cpu | cuda. PyPI's Linux torch wheel is the CUDA build (its CUDA libraries come as nvidia-* wheels), so
# with no TORCH_INDEX_URL both variants install the same torch; a CPU-only torch needs an index that has
# one (https://download.pytorch.org/whl/cpu). TORCH_INDEX_URL is used for torch and torchvision only.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv
WORKDIR /src

# 1. torch and torchvision: the largest layer, rebuilt only when constraints.txt or the variant changes
COPY constraints.txt ./
RUN set -eu; \
    case "$TORCH_VARIANT" in cpu|cuda) ;; *) echo "TORCH_VARIANT must be cpu or cuda, got '$TORCH_VARIANT'" >&2; exit 2;; esac; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" -c constraints.txt torch torchvision \
        || { echo "no torch from TORCH_INDEX_URL=$TORCH_INDEX_URL: unreachable from this build, or no wheel" \
                  "matching constraints.txt there (pip says ResolutionImpossible for both); leave it empty for PyPI" >&2; \
             exit 1; }; \
    else \
        pip install -c constraints.txt torch torchvision; \
    fi; \
    python -c "import sys, torch; cuda = torch.version.cuda; \
print(f'torch {torch.__version__}, CUDA {cuda or \"none (CPU-only build)\"}'); \
sys.exit(f'TORCH_VARIANT=cuda needs a CUDA build of torch, got {torch.__version__}' if '$TORCH_VARIANT' == 'cuda' and not cuda else 0)"

# 2. the other runtime dependencies. EXTRA_REQUIREMENTS: more pip specs to install beside them (space-separated,
# one pip argument per word, hence unquoted); declared here, after the torch layer, so it does not invalidate it
COPY --from=requirements /src/requirements.txt ./
ARG EXTRA_REQUIREMENTS=""
RUN pip install -c constraints.txt -r requirements.txt ${EXTRA_REQUIREMENTS}

# --- build: the project as a wheel ---------------------------------------------------------------------
FROM deps AS build
COPY pyproject.toml README.md ./
COPY scanner ./scanner
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: the same base, the virtual environment, a non-root user ----------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="backdoor-scan" \
      org.opencontainers.image.description="Scan image-classifier checkpoints for backdoors (API and workers)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.backdoor-scan.torch-variant="${TORCH_VARIANT}"

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BDS_DATA_DIR=/data

RUN groupadd --gid 10001 bds \
    && useradd --uid 10001 --gid bds --home-dir /home/bds --create-home --shell /usr/sbin/nologin bds \
    && mkdir -p /data \
    && chown bds:bds /data

# root-owned and read-only for the app user. Two layers: the dependencies (GBs, changed only by
# constraints.txt, the dependency list or the build arguments), then the project's own wheel (KBs)
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && backdoor-scan --help >/dev/null

USER 10001:10001
WORKDIR /home/bds
# uploads, artifacts (and the embedded SQLite databases when BDS_DATABASE_URL/BDS_QUEUE_URL are unset):
# mount one volume here and share it between the API and every worker
VOLUME ["/data"]
EXPOSE 8000

# the API's liveness; a worker container (no HTTP) should turn it off (docker-compose.yml does)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4)"]

CMD ["backdoor-scan", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
