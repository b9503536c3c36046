#!/usr/bin/env bash
# A private Docker engine for the image tests: its own data root, socket and pid file, no bridge, no
# iptables (containers use the host network and talk to 127.0.0.1 only). Stopped by its PID, never by name.
#
#   .ci/dockerd.sh start   start it (no-op if ours already runs); prints the DOCKER_HOST to use
#   .ci/dockerd.sh stop    stop the one we started
#   .ci/dockerd.sh running exit 0 if ours runs (a zombie does not count)
set -euo pipefail

run_dir=${SIDECAR_CI_DOCKER_RUN:-/run/sidecar-ci-docker}
data_root=${SIDECAR_CI_DOCKER_DATA:-/var/lib/sidecar-ci-docker}
sock="$run_dir/docker.sock"
pidfile="$run_dir/dockerd.pid"
log="$run_dir/dockerd.log"

ours_running() {
  # A killed engine can linger as a zombie that kill -0 still finds: it counts as running only if its
  # state is not Z.
  local pid
  [[ -s "$pidfile" ]] || return 1
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

case "${1:-}" in
  start)
    mkdir -p "$run_dir" "$data_root"
    if ! ours_running; then
      # A dockerd of ours that was killed (a session ends so) leaves its private exec root and socket
      # behind; they are ours alone, so start from a clean one.
      # Its network namespace stays bind-mounted there (nsfs) after a kill, and rm cannot remove a mount
      # point: unmount what lies under our own exec root first, deepest first.
      if [[ -d "$run_dir/exec" ]]; then
        awk -v root="$run_dir/exec" 'index($5, root "/") == 1 || $5 == root { print $5 }' \
          /proc/self/mountinfo | sort -r | while read -r mnt; do umount -l -- "$mnt"; done
      fi
      rm -rf -- "$run_dir/exec" "$sock" "$pidfile"
      # setsid: the engine must not share our process group (a Ctrl-C of the test run must not kill it
      # half-way through a build); it is stopped below, by its PID.
      setsid dockerd --data-root "$data_root" --exec-root "$run_dir/exec" --pidfile "$pidfile" \
        --host "unix://$sock" --iptables=false --ip6tables=false --bridge=none --ip-masq=false \
        >"$log" 2>&1 </dev/null &
      for _ in $(seq 1 120); do
        if DOCKER_HOST="unix://$sock" docker version >/dev/null 2>&1; then break; fi
        sleep 0.5
      done
    fi
    if ! DOCKER_HOST="unix://$sock" docker version >/dev/null 2>&1; then
      echo "dockerd did not answer on $sock within 60 s; its log:" >&2
      tail -n 30 "$log" >&2 || true
      exit 1
    fi
    echo "unix://$sock"
    ;;
  running)
    ours_running
    ;;
  stop)
    if ours_running; then
      pid=$(cat "$pidfile")
      kill -TERM "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    ;;
  *)
    echo "usage: $0 start|stop|running" >&2
    exit 2
    ;;
esac
