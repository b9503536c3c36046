#!/usr/bin/env bash
# Container entrypoint of the ComfyUI + comfyui-r2-sidecar image; PID 1.
#
#   no arguments  prepare the folders, move the secrets out of the environment, refuse a bad sidecar
#                 configuration (its one-line message, exit 2, nothing started), then run supervisord
#                 (ComfyUI as root, the sidecar as its own user), forwarding every stop signal to it at
#                 once; exit 70 if supervisord gave up on the sidecar (FATAL), so the pod restarts.
#   arguments     prepare the folders, then exec the arguments as the sidecar's user (`sidecar scan`,
#                 `sidecar status`, `bash`, ...), with the same configuration the daemon sees.
#
# Secrets (SIDECAR_ACCESS_KEY_ID, SIDECAR_SECRET_ACCESS_KEY, SIDECAR_HTTP_TOKEN, SIDECAR_WEBHOOK_SECRET and
# SIDECAR_WEBHOOK_URL, whose query often carries a token) are written to files in
# SIDECAR_SECRETS_DIR that only the sidecar's user can read, and removed from the environment that
# supervisord, and so ComfyUI and its custom nodes, inherit. The sidecar reads them back from there.
#
# Every path is an environment variable so the same script runs outside a container (the tests do).
set -euo pipefail

EXIT_CONFIG=2
EXIT_SIDECAR_FATAL=70
SECRET_VARS=(SIDECAR_ACCESS_KEY_ID SIDECAR_SECRET_ACCESS_KEY SIDECAR_HTTP_TOKEN SIDECAR_WEBHOOK_SECRET SIDECAR_WEBHOOK_URL)

fail() {
  echo "entrypoint: $1" >&2
  exit "${2:-$EXIT_CONFIG}"
}

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

uid=$(id -u)
: "${SIDECAR_WATCH_DIR:=/workspace/outputs}"
: "${SIDECAR_STATE_DIR:=/workspace/.sidecar}"
: "${SIDECAR_BIN:=/opt/sidecar/bin/sidecar}"
: "${SIDECAR_USER:=sidecar}"
: "${SUPERVISORD_BIN:=/opt/sidecar/bin/supervisord}"
: "${SUPERVISORD_CONF:=/opt/sidecar/etc/supervisord.conf}"
if [[ "$uid" -eq 0 ]]; then
  : "${SUPERVISOR_RUN_DIR:=/run/sidecar-supervisor}"
  : "${SIDECAR_SECRETS_DIR:=/run/sidecar-secrets}"
else
  : "${SUPERVISOR_RUN_DIR:=${TMPDIR:-/tmp}/sidecar-supervisor-$uid}"
  : "${SIDECAR_SECRETS_DIR:=$SUPERVISOR_RUN_DIR/secrets}"
fi
: "${COMFYUI_CMD:=python /comfyui/main.py --listen 0.0.0.0 --port 8188}"
: "${COMFYUI_AUTOSTART:=true}"
# The sidecar asks ComfyUI's job API which prompt wrote each file: on the port COMFYUI_CMD listens on,
# unless SIDECAR_COMFYUI_URL says otherwise (set it empty to turn jobs off).
if [[ -z "${SIDECAR_COMFYUI_URL+set}" && "$COMFYUI_CMD" =~ --port[=\ ]+([0-9]+) ]]; then
  SIDECAR_COMFYUI_URL="http://127.0.0.1:${BASH_REMATCH[1]}"
  export SIDECAR_COMFYUI_URL
fi
: "${SIDECAR_STOPWAITSECS:=$(default_stopwaitsecs)}"
# SIDECAR_BIN may hold arguments ("python -m sidecar" in the tests); the listener needs its python.
read -r -a sidecar_cmd <<<"$SIDECAR_BIN"
if [[ "$(basename "${sidecar_cmd[0]}")" == python* ]]; then
  : "${SIDECAR_PYTHON:=${sidecar_cmd[0]}}"
else
  : "${SIDECAR_PYTHON:=$(dirname "${sidecar_cmd[0]}")/python}"
fi
export SIDECAR_WATCH_DIR SIDECAR_STATE_DIR SIDECAR_BIN SIDECAR_USER SUPERVISORD_BIN SUPERVISORD_CONF \
  SUPERVISOR_RUN_DIR SIDECAR_SECRETS_DIR COMFYUI_CMD COMFYUI_AUTOSTART SIDECAR_STOPWAITSECS SIDECAR_PYTHON

# supervisord can switch users only when it runs as root; `docker run --user N` runs everything as N,
# which supervisord accepts only for a user with a name.
if [[ "$uid" -ne 0 ]]; then
  SIDECAR_USER="$(id -un 2>/dev/null)" \
    || fail "uid $uid has no entry in /etc/passwd, which supervisord needs; run as root (the default) or as a named user (--user sidecar)"
elif ! id -u "$SIDECAR_USER" >/dev/null 2>&1; then
  echo "entrypoint: user '$SIDECAR_USER' does not exist; the sidecar runs as root" >&2
  SIDECAR_USER=root
fi

# A folder given as a symbolic link could send the chown below (and the journal) anywhere: refuse it.
prepare_dir() {
  local name=$1 dir=$2
  if [[ -L "$dir" ]]; then
    fail "$name=$dir is a symbolic link; point $name at the real folder"
  fi
  if ! mkdir -p -- "$dir" 2>/dev/null || [[ ! -d "$dir" ]]; then
    fail "$name=$dir cannot be created as uid $uid; mount a folder this user may write, or run as root"
  fi
}
prepare_dir SIDECAR_WATCH_DIR "$SIDECAR_WATCH_DIR"
prepare_dir SIDECAR_STATE_DIR "$SIDECAR_STATE_DIR"
chmod 700 -- "$SIDECAR_STATE_DIR"

# ComfyUI does not create its output folder; the watcher needs it before it starts. The journal's folder
# is the sidecar's alone: a one-off command run as root may have left root-owned files in it. -h and the
# -R default (-P) never follow a link, so a link planted in the state folder cannot hand out other files.
if [[ "$uid" -eq 0 && "$SIDECAR_USER" != root ]]; then
  chown -R -h -- "$SIDECAR_USER:" "$SIDECAR_STATE_DIR"
  chown -h -- "$SIDECAR_USER:" "$SIDECAR_WATCH_DIR"
fi

# Retention deletes uploaded files, which needs write permission on their folders, and ComfyUI (root)
# creates its subfolders 0755 root:root. With a policy set, the output folder gets the sidecar's group
# with setgid, so every folder made below it inherits that group, and ComfyUI runs with umask 002, so
# those folders are group-writable. Folders that already exist get the same (folders only, never a file,
# never through a link). Without a policy nothing changes and ComfyUI keeps umask 022.
COMFYUI_UMASK=022
if [[ -n "${SIDECAR_DELETE_AFTER_S:-}${SIDECAR_DISK_MIN_FREE:-}${SIDECAR_KEEP_MAX_BYTES:-}" ]]; then
  if [[ "$uid" -eq 0 && "$SIDECAR_USER" != root ]]; then
    group="$(id -gn "$SIDECAR_USER")"
    find "$SIDECAR_WATCH_DIR" -xdev -type d \( ! -group "$group" -o ! -perm -2070 \) \
      -exec chgrp -h -- "$group" {} + -exec chmod g+rwxs -- {} +
  fi
  COMFYUI_UMASK=002
fi
export COMFYUI_UMASK

# Secrets: one file per variable (the name pydantic-settings looks for), readable by the sidecar only.
prepare_dir SIDECAR_SECRETS_DIR "$SIDECAR_SECRETS_DIR"
chmod 700 -- "$SIDECAR_SECRETS_DIR"
moved=()
for var in "${SECRET_VARS[@]}"; do
  if [[ -n "${!var+set}" ]]; then
    file="$SIDECAR_SECRETS_DIR/${var,,}"
    rm -f -- "$file"
    if [[ -n "${!var}" ]]; then
      (umask 077 && printf '%s' "${!var}" >"$file")
    fi
    moved+=(-u "$var")
  fi
done
if [[ "$uid" -eq 0 && "$SIDECAR_USER" != root ]]; then
  chown -R -h -- "$SIDECAR_USER:" "$SIDECAR_SECRETS_DIR"
fi
# /proc/<pid>/environ shows the environment a process was started with, whatever it unsets later: start
# this script again without the secrets, so that not even PID 1 shows them.
if [[ ${#moved[@]} -gt 0 ]]; then
  exec env "${moved[@]}" "$BASH" "$0" "$@"
fi

# Run a command as the sidecar's user (no supplementary groups, the environment as it now is: without
# the secrets), or as is when that is who we are.
as_sidecar() {
  if [[ "$uid" -eq 0 && "$SIDECAR_USER" != root ]]; then
    command -v setpriv >/dev/null || fail "setpriv (util-linux) is missing: cannot run as $SIDECAR_USER"
    exec setpriv --reuid="$SIDECAR_USER" --regid="$(id -g "$SIDECAR_USER")" --clear-groups -- "$@"
  fi
  exec "$@"
}

if [[ $# -gt 0 ]]; then
  as_sidecar "$@"
fi

# Refuse a bad configuration before anything starts: `sidecar check --offline` validates everything
# `sidecar run` needs (bucket included) without a request, prints the variable and what is wrong on one
# line and exits 2. It runs as the daemon will, so folders it cannot write are caught here too.
(as_sidecar "${sidecar_cmd[@]}" check --offline >/dev/null) || exit $?

prepare_dir SUPERVISOR_RUN_DIR "$SUPERVISOR_RUN_DIR"
chmod 700 -- "$SUPERVISOR_RUN_DIR"
rm -f -- "$SUPERVISOR_RUN_DIR/sidecar-fatal"

# PID 1: supervisord as a child, so that a FATAL sidecar can end the container with a non-zero status
# (supervisord itself always exits 0). A trapped signal interrupts `wait` at once: forwarding costs no time.
"$SUPERVISORD_BIN" -n -c "$SUPERVISORD_CONF" &
supervisord_pid=$!
# shellcheck disable=SC2329  # invoked by the traps below
forward() { kill -s "$1" "$supervisord_pid" 2>/dev/null || true; }
for sig in TERM INT QUIT HUP; do
  # shellcheck disable=SC2064  # the signal name is fixed when the trap is set
  trap "forward $sig" "$sig"
done
while kill -0 "$supervisord_pid" 2>/dev/null; do
  wait "$supervisord_pid" || true  # returns early for each forwarded signal
done
status=0
wait "$supervisord_pid" || status=$?  # its saved exit status
if [[ -e "$SUPERVISOR_RUN_DIR/sidecar-fatal" ]]; then
  echo "entrypoint: the sidecar could not be started (FATAL); exiting $EXIT_SIDECAR_FATAL so the pod restarts" >&2
  exit "$EXIT_SIDECAR_FATAL"
fi
exit "$status"
