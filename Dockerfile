# syntax=docker/dockerfile:1
#
# A ComfyUI image with comfyui-r2-sidecar baked in, both run by supervisord (see "Deploying on RunPod" in README.md).
#
#   docker build -t my-comfyui-r2 .
#   docker build --build-arg COMFYUI_IMAGE=<your ComfyUI image> \
#                --build-arg COMFYUI_CMD="python /ComfyUI/main.py --listen 0.0.0.0 --port 8188" .
#
# COMFYUI_IMAGE: any image with ComfyUI and a Python >= 3.11 that has the venv module. The default is
# RunPod's public ComfyUI base (Ubuntu 24.04, Python 3.12, ComfyUI in /comfyui, its venv on PATH).
# The sidecar is built with that image's own Python into /opt/sidecar, a venv of its own, so neither
# ComfyUI nor a custom node's requirements can ever clash with the sidecar's.
ARG COMFYUI_IMAGE=runpod/worker-comfyui:5.4.1-base

# ---------------------------------------------------------------------------------------------------
# builder: the sidecar and supervisord in /opt/sidecar. tests/test_packaging.py replays this stage's
# instructions outside Docker, so its RUN lines use only relative paths and the ARG/ENV variables.
FROM ${COMFYUI_IMAGE} AS builder
ARG SIDECAR_PYTHON=python3
ARG SIDECAR_VENV=/opt/sidecar
ARG SUPERVISOR_VERSION=4.3.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1
WORKDIR /build

# Dependencies first (they change less often than the code): read from pyproject.toml.
COPY pyproject.toml ./
RUN "${SIDECAR_PYTHON}" -m venv "${SIDECAR_VENV}" \
 && "${SIDECAR_VENV}/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
 && "${SIDECAR_VENV}/bin/pip" install --no-cache-dir -r requirements.txt "supervisor==${SUPERVISOR_VERSION}"

# Then the code: a wheel, installed without touching the dependencies; pip itself is not shipped.
COPY README.md ./
COPY sidecar/ ./sidecar/
RUN "${SIDECAR_VENV}/bin/pip" wheel . --no-deps --wheel-dir dist \
 && "${SIDECAR_VENV}/bin/pip" install --no-cache-dir --no-deps dist/*.whl \
 && "${SIDECAR_VENV}/bin/pip" check \
 && "${SIDECAR_VENV}/bin/python" -m pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------------
# final: the ComfyUI image plus /opt/sidecar, supervisord.conf and entrypoint.sh. No compiler, no pip
# of ours; the container starts as root so supervisord can run ComfyUI as the base image does and the
# sidecar as the unprivileged user "sidecar".
FROM ${COMFYUI_IMAGE}
ARG COMFYUI_CMD="python /comfyui/main.py --listen 0.0.0.0 --port 8188"

RUN (getent passwd sidecar >/dev/null || useradd --system --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar) \
 && ln -sf /opt/sidecar/bin/sidecar /usr/local/bin/sidecar

# The same defaults entrypoint.sh applies, set here too so `docker exec` sessions (sidecar status,
# /opt/sidecar/bin/supervisorctl status) see what the daemon sees. /opt/sidecar/bin is deliberately
# not on PATH: ComfyUI's `python` must stay ComfyUI's.
ENV SIDECAR_WATCH_DIR=/workspace/outputs \
    SIDECAR_STATE_DIR=/workspace/.sidecar \
    SIDECAR_HTTP_PORT=9188 \
    SIDECAR_USER=sidecar \
    SIDECAR_BIN=/opt/sidecar/bin/sidecar \
    SUPERVISORD_BIN=/opt/sidecar/bin/supervisord \
    SUPERVISORD_CONF=/opt/sidecar/etc/supervisord.conf \
    SUPERVISOR_RUN_DIR=/run/sidecar-supervisor \
    COMFYUI_CMD=${COMFYUI_CMD} \
    PYTHONUNBUFFERED=1

# 8188: ComfyUI's web UI and API. 9188: the sidecar's /healthz, /readyz, /metrics, /status.
EXPOSE 8188 9188

# Liveness of the sidecar (process up, watcher proven by its canary). /healthz needs no token.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/sidecar/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SIDECAR_HTTP_PORT', '9188'), timeout=4)"]

# Least to most often changed: the scripts, then the venv (new with every code change).
COPY supervisord.conf /opt/sidecar/etc/supervisord.conf
COPY --chmod=0755 entrypoint.sh /usr/local/bin/sidecar-entrypoint
COPY --from=builder /opt/sidecar /opt/sidecar

ENTRYPOINT ["/usr/local/bin/sidecar-entrypoint"]
# ENTRYPOINT resets the base image's CMD: no arguments means supervisord runs ComfyUI and the sidecar.
CMD []
