#!/usr/bin/env bash
# Install what the benchmark needs. Idempotent: each step runs only when its tool is missing.
#   Debian: inotify-tools (inotifywait), rclone, stunnel4 (the https variant)
#   PyPI:   localbucket (the S3 server), awscli, boto3, and the daemon's own dependencies
# Usage: bash bench/setup.sh [--profilers]   (--profilers also installs py-spy and pyinstrument)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-python3}"
want_profilers=0
[[ "${1:-}" == "--profilers" ]] && want_profilers=1

need_apt=()
command -v inotifywait >/dev/null 2>&1 || need_apt+=(inotify-tools)
command -v rclone >/dev/null 2>&1 || need_apt+=(rclone)
command -v stunnel4 >/dev/null 2>&1 || need_apt+=(stunnel4)  # run.py --tls: TLS in front of the server
if ((${#need_apt[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: need root to apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
    echo "setup: apt-get install ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

need_pip=()
"$python" -c "import localbucket" 2>/dev/null || need_pip+=(localbucket)
"$python" -c "import awscli" 2>/dev/null || need_pip+=(awscli)
"$python" -c "import boto3" 2>/dev/null || need_pip+=("boto3>=1.36")
# The daemon runs from the work tree (PYTHONPATH), so only its dependencies are installed.
deps="$("$python" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib, importlib.util
names = {"watchdog": "watchdog", "boto3": "boto3", "tenacity": "tenacity", "structlog": "structlog",
         "prometheus-client": "prometheus_client", "pydantic-settings": "pydantic_settings"}
with open(sys.argv[1], "rb") as f:
    for spec in tomllib.load(f)["project"]["dependencies"]:
        name = spec.split(">")[0].split("=")[0].split("<")[0].strip()
        module = names.get(name, name.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            print(spec)
EOF
)"
[[ -n "$deps" ]] && mapfile -t -O "${#need_pip[@]}" need_pip <<<"$deps"
if ((want_profilers)); then
    command -v py-spy >/dev/null 2>&1 || need_pip+=(py-spy)
    "$python" -c "import pyinstrument" 2>/dev/null || need_pip+=(pyinstrument)
fi
if ((${#need_pip[@]})); then
    echo "setup: pip install ${need_pip[*]}" >&2
    "$python" -m pip install -q "${need_pip[@]}"
fi
echo "setup: ok" >&2
