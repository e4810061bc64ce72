#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py says what it runs): one command, under 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh          # on a GPU machine: writes docs/gpu.md and benchmarks/results/gpu_check.json
#   bash benchmarks/gpu_check.sh --dry    # anywhere: the parts that need no GPU (CI runs this)
# A machine without diffusers installs it from wheels in .whl/ if present (bash benchmarks/gpu_wheels.sh fetches
# them beforehand on a machine that reaches PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tdm_site .whl/*.whl
  export PYTHONPATH=/tmp/tdm_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec "$PY" benchmarks/gpu_check.py "$@"
