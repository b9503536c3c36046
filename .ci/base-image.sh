#!/usr/bin/env bash
# Builds, without any image registry, the stand-in for RunPod's ComfyUI base that the image tests build
# the project's Dockerfile on (FIELD-NOTES §6):
#   1. a minimal Debian root filesystem by debootstrap (python3, python3-venv, ca-certificates), imported
#      as an image; cached as a tarball keyed by the hash of this recipe, written atomically, so a second
#      run reuses it and a killed run leaves nothing half-made behind;
#   2. on top of it, tests/container/base/: a venv at /opt/venv first on PATH and a stand-in ComfyUI in
#      /comfyui (tests/support/comfyui_standin.py), like runpod-workers/worker-comfyui, plus this host's
#      CA certificates (package traffic passes a TLS proxy here; the shipped Dockerfile knows nothing of it).
# Prints the tag of the ComfyUI-like base.   Needs: DOCKER_HOST, debootstrap, root.
set -euo pipefail
cd "$(dirname "$0")/.."

docker=${DOCKER:-/usr/bin/docker}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,ca-certificates
cache=${SIDECAR_CI_CACHE:-/var/cache/comfyui-r2-sidecar-ci}

recipe=$(printf '%s\n' "$suite" "$mirror" "$packages" | cat - "$0" | sha256sum | cut -c1-16)
rootfs_tag="sidecar-ci-rootfs:$recipe"
tarball="$cache/rootfs-$suite-$recipe.tar"

if ! "$docker" image inspect "$rootfs_tag" >/dev/null 2>&1; then
  if [[ ! -s "$tarball" ]]; then
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf -- "$work"' EXIT
    echo "base: debootstrap $suite ($packages)" >&2
    debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 \
      || { tail -n 20 "$work/log" >&2; exit 1; }
    rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
    tar -C "$work/root" --numeric-owner -cf "$work/rootfs.tar" .
    mv -f -- "$work/rootfs.tar" "$tarball"
  else
    echo "base: cached root filesystem $tarball" >&2
  fi
  "$docker" import "$tarball" "$rootfs_tag" >/dev/null
fi

ctx=$(mktemp -d)
trap 'rm -rf -- "$ctx"' EXIT
cp tests/container/base/Dockerfile "$ctx/"
cp tests/support/comfyui_standin.py "$ctx/main.py"
mkdir -p "$ctx/ca"
cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
base_tag="sidecar-ci-comfyui-base:$recipe-$(cat "$ctx/Dockerfile" "$ctx/main.py" "$ctx"/ca/* 2>/dev/null | sha256sum | cut -c1-12)"
if ! "$docker" image inspect "$base_tag" >/dev/null 2>&1; then
  "$docker" build -q --network host --build-arg ROOTFS="$rootfs_tag" -t "$base_tag" "$ctx" >/dev/null
fi
echo "$base_tag"
