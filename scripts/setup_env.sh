#!/usr/bin/env bash
# Create .venv and install Magi. On a machine without CUDA the CPU build of torch is taken
# (pinned here only when no torch is installed yet and no GPU is visible).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch>=2.5"
  else
    # CPU machines: the CPU wheel, not a multi-GB CUDA build.
    pip install -q "torch==2.13.0" || pip install -q "torch>=2.5"
  fi
fi
# DeepSpeed (the test extra; parallel.dp_mode=deepspeed): no compiled ops at install, torch's AdamW is used
DS_BUILD_OPS=0 pip install -q -e ".[test]"
