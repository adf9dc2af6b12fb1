# softdimo inference server image.
#
#   GPU (default): docker build -t softdimo:cuda .
#   CPU:           docker build --build-arg VARIANT=cpu -t softdimo:cpu .
#
# Both variants share every layer from "app" down; only the base (OS, Python,
# torch wheel index) differs. Extra model bundles can be mounted read-only at
# /models and selected with SOFTDIMO_WEIGHTS=/models/<bundle>[,...].

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG CPU_IMAGE=python:3.11-slim-bookworm
# Where each variant's torch wheel comes from.
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------- GPU base --
FROM ${CUDA_IMAGE} AS base-cuda
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_CUDA_INDEX_URL
# Ubuntu's own python3.11 (universe); apt versions are not pinned because the
# archive drops superseded versions, which would break rebuilds. Security
# updates come from rebuilding on a fresh base image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV TORCH_INDEX_URL=${TORCH_CUDA_INDEX_URL} \
    SOFTDIMO_DEVICE=auto

# ---------------------------------------------------------------- CPU base --
FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_CPU_INDEX_URL
RUN python -m venv /opt/venv
ENV TORCH_INDEX_URL=${TORCH_CPU_INDEX_URL} \
    SOFTDIMO_DEVICE=cpu

# --------------------------------------------------------------------- app --
# The base is one of the two stages above (their images are tagged through the
# CUDA_IMAGE / CPU_IMAGE defaults), so there is no registry tag to pin here.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS app
ARG TORCH_VERSION=2.13.0
# Optional dependency groups of pyproject.toml to install too, comma-separated: e.g. --build-arg EXTRAS=diffusers
# for serving diffusers MUSE-family checkpoints mounted under /models.
ARG EXTRAS=""
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# 1. torch alone: the largest layer, and it changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app

# 2. The project's declared dependencies, read from pyproject.toml, so that
#    editing code does not reinstall them. torch is already satisfied above.
#    README* is optional (the glob may match nothing); pyproject may name it.
COPY pyproject.toml README* ./
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p.get("dependencies", []) + [d for e in filter(None, sys.argv[1].split(",")) for d in p["optional-dependencies"][e]]))' "${EXTRAS}" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 3. The code itself (dependencies are in place, hence --no-deps). Installed
#    in place (-e): the server finds its shipped bundles relative to its own
#    source (server/settings.py: <source>/../weights), so the code must stay at
#    /app next to /app/weights rather than move into site-packages. benchmarks/
#    holds the installed `softdimo` command's entry point (with soak and the
#    server benchmarks), so it comes along; the server never imports it.
COPY softdimo ./softdimo
COPY server ./server
COPY benchmarks ./benchmarks
RUN pip install --no-deps -e . \
 && rm -rf build ./*.egg-info

# 4. Non-root runtime user (numeric, so Kubernetes runAsNonRoot can verify it).
#    /models is the mount point for extra bundles; /tmp is the only place the
#    server writes (Kubernetes mounts an emptyDir there, the root stays read-only).
RUN groupadd --system --gid 10001 softdimo \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin softdimo \
 && mkdir -p /models \
 && chown 10001:10001 /models

# 5. Default weights, baked in: bundle folders under /app/weights, served when
#    SOFTDIMO_WEIGHTS is unset.
COPY --chown=10001:10001 weights ./weights

# 6. The job store's SQLite file lives in /tmp, the one writable place: jobs there outlive a restart of the
#    container, not of the pod. Replicas that share jobs, or pods that come and go, set SOFTDIMO_JOB_STORE=redis.
ENV SOFTDIMO_JOB_DB_PATH=/tmp/softdimo-jobs.sqlite3

USER 10001:10001
EXPOSE 8000

# Ready (models loaded and warmed), not merely alive: a container that is still
# loading or draining reports unhealthy. start-period covers loading + warm-up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]

# Exec form: the server is PID 1 and receives SIGTERM itself, then drains for
# SOFTDIMO_DRAIN_TIMEOUT_S (30 s by default); give `docker stop` at least that
# long (docker run --stop-timeout 45).
ENTRYPOINT ["softdimo"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
