#!/usr/bin/env bash
# Refresh the image's lock files: every Python package of the image (image-requirements.txt) and of its
# builder stage (build-requirements.txt), pinned, with the hashes of all their published files (the
# Dockerfile installs both with --require-hashes). Run after changing the dependencies in pyproject.toml
# or deploy/*.in:   bash deploy/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q 'pip-tools>=7.4,<8'
CUSTOM_COMPILE_COMMAND="bash deploy/lock.sh" python3 -m piptools compile --quiet --generate-hashes \
  --allow-unsafe --strip-extras --no-emit-index-url --output-file deploy/image-requirements.txt \
  pyproject.toml deploy/image-requirements.in
CUSTOM_COMPILE_COMMAND="bash deploy/lock.sh" python3 -m piptools compile --quiet --generate-hashes \
  --allow-unsafe --strip-extras --no-emit-index-url --output-file deploy/build-requirements.txt \
  deploy/build-requirements.in
