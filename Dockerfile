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
#
# No "# syntax=" line and no BuildKit-only instruction: the file builds with the legacy builder and with
# BuildKit alike, on a machine that reaches no image registry but the one holding COMFYUI_IMAGE. Every
# Python package comes from deploy/*-requirements.txt, pinned with hashes (refresh: bash deploy/lock.sh).
ARG COMFYUI_IMAGE=runpod/worker-comfyui:5.4.1-base

# ---------------------------------------------------------------------------------------------------
# builder: the sidecar and supervisord in /opt/sidecar. tests/test_packaging.py replays this stage's
# instructions outside Docker, so its RUN lines use only relative paths and the ARG/ENV variables.
FROM ${COMFYUI_IMAGE} AS builder
ARG SIDECAR_PYTHON=python3
ARG SIDECAR_VENV=/opt/sidecar
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1
WORKDIR /build

# Dependencies first (they change less often than the code), exactly as locked.
COPY deploy/image-requirements.txt deploy/build-requirements.txt ./
RUN "${SIDECAR_PYTHON}" -m venv "${SIDECAR_VENV}" \
 && "${SIDECAR_VENV}/bin/pip" install --no-cache-dir --require-hashes --no-deps -r image-requirements.txt \
 && "${SIDECAR_PYTHON}" -m venv build-venv \
 && build-venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r build-requirements.txt

# Then the code: a wheel built by the locked build tools (in build-venv, never shipped), installed without
# touching the dependencies; pip itself is not shipped either.
COPY pyproject.toml README.md LICENSE ./
COPY sidecar/ ./sidecar/
RUN build-venv/bin/pip wheel . --no-deps --no-build-isolation --wheel-dir dist \
 && "${SIDECAR_VENV}/bin/pip" install --no-cache-dir --no-deps dist/*.whl \
 && "${SIDECAR_VENV}/bin/pip" check \
 && "${SIDECAR_VENV}/bin/python" -m pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------------
# final: the ComfyUI image plus /opt/sidecar, supervisord.conf and entrypoint.sh. No compiler, no pip
# of ours; the container starts as root so supervisord can run ComfyUI as the base image does and the
# sidecar as the unprivileged user "sidecar".
FROM ${COMFYUI_IMAGE}
ARG COMFYUI_CMD="python /comfyui/main.py --listen 0.0.0.0 --port 8188"

# The same defaults entrypoint.sh applies, set here too so `docker exec` sessions (sidecar status,
# /opt/sidecar/bin/supervisorctl status) see what the daemon sees. /opt/sidecar/bin is deliberately
# not on PATH: ComfyUI's `python` must stay ComfyUI's. The drain is 2 s: with supervisord's own latency
# (up to ~1 s to see Docker's SIGTERM, up to ~1 s to see the sidecar exit) the stop fits a spot pod's 5 s.
ENV SIDECAR_WATCH_DIR=/workspace/outputs \
    SIDECAR_STATE_DIR=/workspace/.sidecar \
    SIDECAR_HTTP_PORT=9188 \
    SIDECAR_DRAIN_TIMEOUT_S=2 \
    SIDECAR_USER=sidecar \
    SIDECAR_BIN=/opt/sidecar/bin/sidecar \
    SIDECAR_PYTHON=/opt/sidecar/bin/python \
    SUPERVISORD_BIN=/opt/sidecar/bin/supervisord \
    SUPERVISORD_CONF=/opt/sidecar/etc/supervisord.conf \
    COMFYUI_CMD=${COMFYUI_CMD} \
    PYTHONUNBUFFERED=1

# 8188: ComfyUI's web UI and API. 9188: the sidecar's /healthz, /readyz, /metrics, /status.
EXPOSE 8188 9188

# Liveness of the sidecar (process up, watcher proven by its canary). /healthz needs no token. Docker runs
# the check with the container's configured environment, secrets included: env -i keeps them out of the
# python process, which any process of the container could read.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/bin/sh", "-c", "exec env -i /opt/sidecar/bin/python -c \"import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % sys.argv[1], timeout=4)\" \"${SIDECAR_HTTP_PORT:-9188}\""]

# Least to most often changed: the scripts, then the venv (new with every code change).
COPY supervisord.conf /opt/sidecar/etc/supervisord.conf
COPY entrypoint.sh /usr/local/bin/sidecar-entrypoint
RUN (getent passwd sidecar >/dev/null || useradd --system --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar) \
 && chmod 0755 /usr/local/bin/sidecar-entrypoint \
 && ln -sf /opt/sidecar/bin/sidecar /usr/local/bin/sidecar
COPY --from=builder /opt/sidecar /opt/sidecar

ENTRYPOINT ["/usr/local/bin/sidecar-entrypoint"]
# ENTRYPOINT resets the base image's CMD: no arguments means supervisord runs ComfyUI and the sidecar.
CMD []
