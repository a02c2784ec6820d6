#!/usr/bin/env bash
# On a machine with a CUDA GPU and the project installed (pip install -e '.[torch]', torch with CUDA):
# runs the PyTorch demo sweep on the GPUs and on the CPU, checks in MLflow that the GPU trials really
# trained on CUDA, and prints per-epoch time GPU vs CPU and GPU utilisation.
#   bench/gpu_check.sh [--cpu-only] [--work DIR]     (details: bench/gpu_check.py --help)
# Exit: 0 ok, 1 a check failed, 2 no usable GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [[ " $* " != *" --cpu-only "* ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "error: no usable GPU: nvidia-smi not found (no NVIDIA driver on this machine). Run on a GPU machine, or pass --cpu-only." >&2
  exit 2
fi
if [[ " $* " != *" --cpu-only "* ]]; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" bench/gpu_check.py "$@"
