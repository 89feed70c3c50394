#!/usr/bin/env bash
# The test command: build into .venv (if needed) and run the whole suite on the CPU, Triton kernels under
# the interpreter. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh .venv
exec .venv/bin/python -m pytest -q "$@"
