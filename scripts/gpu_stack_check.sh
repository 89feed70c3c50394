#!/usr/bin/env bash
# The GPU machine's software stack, on a CPU machine: Python 3.12, torch 2.11.0+cu130 (PyPI's CUDA build; it runs
# on the CPU), triton 3.6.0, transformers 5.17 (see bench/device_check.sh). It builds the extension WITH its CUDA
# kernels exactly as device_check.sh does there (MGPT_CUDA=on, CUTLASS headers from .cutlass/*.whl), checks that
# it loads, then runs the test suite on the CPU. This catches what CI (torch 2.13 CPU, CUDA compiled to objects
# only) cannot, before a short GPU lease is spent on it: link errors against a CUDA torch, and API differences of
# the older torch / transformers.
#
#   bash scripts/gpu_stack_check.sh [pytest args]     # e.g. -x, or a test file
#
# Needs python3.12, nvcc, network for the first run (about 3 GB of wheels into $GPU_STACK_VENV, default
# /tmp/mgpt-gpu-stack) and the nvidia-cutlass wheel in .cutlass/ (pip download nvidia-cutlass==4.2.0.0 --no-deps
# -d .cutlass). Works on a clone of HEAD (commit first): the checkout is left as it is. vLLM is not on the GPU
# machine, so its tests skip here too.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${GPU_STACK_VENV:-/tmp/mgpt-gpu-stack}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$VENV/bin/python" ]; then
  python3.12 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.*" numpy pillow pytest \
    hypothesis nvtx matplotlib scikit-build-core cmake ninja pybind11 safetensors
fi
PY="$VENV/bin/python"
"$PY" -c "import torch; assert torch.version.cuda, 'the GPU stack is a CUDA torch'; print('torch', torch.__version__)"

git clone -q "$ROOT" "$WORK/tree"
ls "$ROOT"/.cutlass/*.whl >/dev/null 2>&1 || { echo "no .cutlass/*.whl: see the header of this script" >&2; exit 1; }
"$PY" -m pip install -q --no-deps --target "$WORK/cutlass" "$ROOT"/.cutlass/*.whl
cd "$WORK/tree"
echo "== build with CUDA kernels (as bench/device_check.sh), commit $(git rev-parse --short HEAD)"
PYTHONPATH="$WORK/cutlass" MGPT_CUDA=on CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$PY" -m pip install -q --no-build-isolation --no-deps --target "$WORK/wheel" .
cp "$WORK"/wheel/mgpt_ops/_C*.so mgpt_ops/
export PYTHONPATH="$WORK/tree/training"
"$PY" -c "import mgpt_ops._ext as e; assert e.loaded() and e.built_with_cuda(), e.load_error(); \
print('extension loaded with CUDA kernels')"
echo "== tests on the CPU"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
