#!/usr/bin/env bash
# Starts the sidecar that deploy/runpod/install.sh put on the volume, in a pod of an existing template.
#
#   pod-start               the pod's Container Start Command (RunPod: Edit Pod → Container Start Command:
#                           `bash /workspace/.sidecar-runtime/bin/pod-start`). The sidecar's entrypoint
#                           becomes PID 1 and supervisord runs, in one group, the sidecar (as user
#                           sidecar) and the template's own start script (SIDECAR_TEMPLATE_START, default
#                           /start.sh: SSH, Jupyter, ComfyUI, as root). Exactly the image's behaviour: the
#                           5 s stop budget, a FATAL sidecar restarts the pod, the secrets reach the
#                           sidecar only, and it survives restarts (everything it needs is on the volume).
#   pod-start --background  from /post_start.sh (install.sh adds it), inside the template's start script:
#                           the sidecar alone under its own supervisord, in the background. The template's
#                           script stays PID 1 and gets the pod's SIGTERM, so at a stop the sidecar is
#                           SIGKILLed without a drain (its journal keeps everything; the next start
#                           uploads the rest), the template's processes keep the secrets in their
#                           environment, and /post_start.sh lives on the container disk (gone at a reset).
#
# ComfyUI's output folder is SIDECAR_WATCH_DIR (default here: /workspace/ComfyUI/output).
set -euo pipefail
home=$(cd "$(dirname "$0")/.." && pwd)

# The container disk is new at every start: make the sidecar's user again.
getent passwd sidecar >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
  --home-dir /nonexistent --shell /usr/sbin/nologin sidecar

export SIDECAR_BIN="$home/venv/bin/sidecar" SIDECAR_PYTHON="$home/venv/bin/python" \
  SUPERVISORD_BIN="$home/venv/bin/supervisord" SUPERVISORD_CONF="$home/etc/supervisord.conf"
export SIDECAR_WATCH_DIR="${SIDECAR_WATCH_DIR:-/workspace/ComfyUI/output}"
export SIDECAR_DRAIN_TIMEOUT_S="${SIDECAR_DRAIN_TIMEOUT_S:-2}"

if [[ "${1:-}" == --background ]]; then
  export COMFYUI_AUTOSTART=false COMFYUI_CMD=true
  # The container's log is PID 1's output: write there, so RunPod's Logs tab shows the sidecar.
  log=/proc/1/fd/1
  [[ -w "$log" ]] || log="$home/sidecar.log"
  setsid "$home/bin/sidecar-entrypoint" </dev/null >>"$log" 2>&1 &
  exit 0
fi
export COMFYUI_CMD="${SIDECAR_TEMPLATE_START:-/start.sh}"
exec "$home/bin/sidecar-entrypoint"
