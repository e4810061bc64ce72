#!/usr/bin/env bash
# Wheels the GPU check needs beyond a stock PyTorch image (diffusers and what it needs), fetched into .whl/ on a
# machine that reaches PyPI, for a GPU machine that does not (Python 3.12, x86-64 Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata zipp
ls .whl
