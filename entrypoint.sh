#!/usr/bin/env bash
# Container entrypoint of the ComfyUI + comfyui-r2-sidecar image.
#
#   no arguments  prepare the folders, refuse a bad sidecar configuration (its one-line message, exit 2,
#                 nothing started), then exec supervisord in the foreground so it is PID 1 and gets
#                 the container's SIGTERM itself.
#   arguments     prepare the folders, then exec the arguments instead (`sidecar scan`, `bash`, ...).
#
# Every path is an environment variable so the same script runs outside a container (the tests do).
set -euo pipefail

# A drain timeout D (SIDECAR_DRAIN_TIMEOUT_S, seconds) gets ceil(D) + 1 s before supervisord's SIGKILL.
default_stopwaitsecs() {
  local drain="${SIDECAR_DRAIN_TIMEOUT_S:-4}" whole
  if [[ "$drain" =~ ^([0-9]+)(\.([0-9]+))?$ ]]; then
    whole=$((10#${BASH_REMATCH[1]}))
    if [[ "${BASH_REMATCH[3]:-}" =~ [1-9] ]]; then
      whole=$((whole + 1))
    fi
    echo "$((whole + 1))"
  else
    echo 5
  fi
}

: "${SIDECAR_WATCH_DIR:=/workspace/outputs}"
: "${SIDECAR_STATE_DIR:=/workspace/.sidecar}"
: "${SIDECAR_BIN:=/opt/sidecar/bin/sidecar}"
: "${SIDECAR_USER:=sidecar}"
: "${SUPERVISORD_BIN:=/opt/sidecar/bin/supervisord}"
: "${SUPERVISORD_CONF:=/opt/sidecar/etc/supervisord.conf}"
: "${SUPERVISOR_RUN_DIR:=/run/sidecar-supervisor}"
: "${COMFYUI_CMD:=python /comfyui/main.py --listen 0.0.0.0 --port 8188}"
: "${SIDECAR_STOPWAITSECS:=$(default_stopwaitsecs)}"
export SIDECAR_WATCH_DIR SIDECAR_STATE_DIR SIDECAR_BIN SIDECAR_USER SUPERVISORD_BIN SUPERVISORD_CONF \
  SUPERVISOR_RUN_DIR COMFYUI_CMD SIDECAR_STOPWAITSECS

# supervisord can switch users only when it runs as root.
if [[ "$(id -u)" -ne 0 ]]; then
  SIDECAR_USER="$(id -un 2>/dev/null || id -u)"
elif ! id -u "$SIDECAR_USER" >/dev/null 2>&1; then
  echo "entrypoint: user '$SIDECAR_USER' does not exist; the sidecar runs as root" >&2
  SIDECAR_USER=root
fi

# ComfyUI does not create its output folder; the watcher needs it before it starts. The journal's
# folder is the sidecar's alone. A one-off `sidecar scan` run as root may have left root-owned journal
# files behind: hand them back on every start.
mkdir -p -- "$SIDECAR_WATCH_DIR" "$SIDECAR_STATE_DIR"
chmod 700 -- "$SIDECAR_STATE_DIR"
if [[ "$(id -u)" -eq 0 && "$SIDECAR_USER" != root ]]; then
  chown -R -- "$SIDECAR_USER:" "$SIDECAR_STATE_DIR"
  chown -- "$SIDECAR_USER:" "$SIDECAR_WATCH_DIR"
fi

if [[ $# -gt 0 ]]; then
  exec "$@"
fi

# Refuse a bad configuration before anything starts: `sidecar check --offline` validates everything
# `sidecar run` needs (bucket included) without a request, prints the variable and what is wrong on one
# line and exits 2. SIDECAR_BIN may hold arguments ("python -m sidecar" in the tests).
read -r -a sidecar_cmd <<<"$SIDECAR_BIN"
"${sidecar_cmd[@]}" check --offline >/dev/null || exit $?

mkdir -p -- "$SUPERVISOR_RUN_DIR"
chmod 700 -- "$SUPERVISOR_RUN_DIR"
exec "$SUPERVISORD_BIN" -n -c "$SUPERVISORD_CONF"
