#!/usr/bin/env bash
# Adds comfyui-r2-sidecar to a pod of an existing ComfyUI template, without rebuilding its image.
# Run once, as root, in the pod's terminal, from a checkout of this repository:
#
#   git clone <this repository> /workspace/comfyui-r2-sidecar
#   bash /workspace/comfyui-r2-sidecar/deploy/runpod/install.sh [--no-hook] [--no-start]
#
# It installs, on the volume (so it survives pod restarts), into SIDECAR_HOME (/workspace/.sidecar-runtime):
#   venv/                  an isolated venv of the pod's python3: the image's locked dependencies
#                          (deploy/image-requirements.txt, --require-hashes), supervisord and the sidecar
#   bin/pod-start          starts it (see that file: as the Container Start Command, or from /post_start.sh)
#   bin/sidecar-entrypoint, etc/supervisord.conf    the image's own entrypoint and supervisord.conf
# then (unless --no-hook) adds one line to /post_start.sh, RunPod's hook that the template's /start.sh runs
# after SSH and Jupyter, and (unless --no-start) starts the sidecar now, in the background.
# Configuration is the pod's SIDECAR_* environment, as for the image (README, "Existing RunPod templates").
set -euo pipefail

fail() {
  echo "install: $1" >&2
  exit 2
}

hook=1
start=1
for arg in "$@"; do
  case "$arg" in
    --no-hook) hook="" ;;
    --no-start) start="" ;;
    *) fail "unknown option $arg (use --no-hook, --no-start)" ;;
  esac
done

src=$(cd "$(dirname "$0")/../.." && pwd)
home=${SIDECAR_HOME:-/workspace/.sidecar-runtime}
python=${SIDECAR_INSTALL_PYTHON:-python3}
marker="# comfyui-r2-sidecar"

[[ "$(id -u)" -eq 0 ]] || fail "run as root (it creates the sidecar's user and the start hook)"
"$python" -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null \
  || fail "$python is not a Python >= 3.11 with the venv module; set SIDECAR_INSTALL_PYTHON"
[[ ! -L "$home" ]] || fail "SIDECAR_HOME=$home is a symbolic link; point it at the real folder"

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
# The checkout may be read-only: build from a copy.
cp -r -- "$src/pyproject.toml" "$src/README.md" "$src/LICENSE" "$src/sidecar" "$work/"
find "$work/sidecar" -name __pycache__ -prune -exec rm -rf {} +

echo "install: venv in $home/venv (locked dependencies, supervisord, the sidecar)"
mkdir -p -- "$home/bin" "$home/etc"
rm -rf -- "$home/venv"
"$python" -m venv "$home/venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$home/venv/bin/pip" install -q --no-cache-dir --require-hashes --no-deps -r "$src/deploy/image-requirements.txt"
"$python" -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install -q --no-cache-dir --require-hashes --no-deps -r "$src/deploy/build-requirements.txt"
"$work/build-venv/bin/pip" wheel -q "$work" --no-deps --no-build-isolation --wheel-dir "$work/dist"
"$home/venv/bin/pip" install -q --no-cache-dir --no-deps "$work"/dist/*.whl
"$home/venv/bin/pip" check >/dev/null
"$home/venv/bin/python" -m pip uninstall -q --yes pip

install -m 0755 "$src/entrypoint.sh" "$home/bin/sidecar-entrypoint"
install -m 0755 "$src/deploy/runpod/pod-start.sh" "$home/bin/pod-start"
install -m 0644 "$src/supervisord.conf" "$home/etc/supervisord.conf"
echo "install: $("$home/venv/bin/sidecar" --version) in $home"

if [[ -n "$hook" ]]; then
  line="bash $home/bin/pod-start --background $marker"
  if [[ -L /post_start.sh ]]; then
    fail "/post_start.sh is a symbolic link; add this line to it yourself: $line"
  elif ! grep -qF -- "$marker" /post_start.sh 2>/dev/null; then
    [[ -s /post_start.sh ]] || echo "#!/bin/bash" >/post_start.sh
    echo "$line" >>/post_start.sh
    echo "install: /post_start.sh starts the sidecar after the template's own start (until the container disk is reset)"
  fi
fi

if [[ -n "$start" ]]; then
  bash "$home/bin/pod-start" --background
  echo "install: the sidecar is starting; 'sidecar status' needs SIDECAR_HTTP_PORT, or see its log lines"
fi
