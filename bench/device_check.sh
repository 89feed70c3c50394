#!/usr/bin/env bash
# One-shot GPU check: build with CUDA, run the GPU tests, benchmark, print the short table last.
#
#   bash bench/device_check.sh RESULTS_DIR
#
# The device copy of the tree has no .git: pass the commit in, e.g. MGPT_COMMIT=$(git rev-parse HEAD) (expanded
# where the command is written), so every result file records it.
#
# Meant for the lent GPU machine (H100/H200, python3 with torch+CUDA, triton, pytest, scikit-build-core,
# cmake, ninja, nvcc; NO network): nothing here reaches an index. Run from anywhere; it works in the
# repository that contains it. Each stage has its own time limit (seconds, override through the
# environment) so one hang cannot eat the budget; a failed build does not stop the rest (Triton paths
# still run). Default limits add up to ~7.5 minutes (build 150 + vision 60 + quant 70 + train 100 + tests 60 s);
# the RL family (measured before) runs when named: BENCH_FAMILIES="rl ...".
#
# Order: build, benchmarks (one run per family, each with its own limit; they check correctness against the
# baselines first), tests.
# Writes flat into RESULTS_DIR: env.json log.txt (build, bench and test logs, one section
# each) tests.xml {family}_cuda.{json,png} per benchmarked family, summary.txt (12 files at most)
set -uo pipefail

R=${1:?usage: bash bench/device_check.sh RESULTS_DIR}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-150}  # each CUTLASS FP8 GEMM is ~50-70 s of nvcc (they build in parallel)
TEST_TIMEOUT=${TEST_TIMEOUT:-60}
# per family: BENCH_TIMEOUT_<family> when set, else BENCH_TIMEOUT
BENCH_TIMEOUT=${BENCH_TIMEOUT:-60}
BENCH_TIMEOUT_quant=${BENCH_TIMEOUT_quant:-70}  # incl. ~20 s of child-process probes of the CUTLASS faces
BENCH_TIMEOUT_train=${BENCH_TIMEOUT_train:-100}  # builds 1.2B / 2.8B-parameter models, times whole steps
BENCH_FAMILIES=${BENCH_FAMILIES:-vision quant train}
# pytest selection; distributed tests are CPU/gloo tests: nothing about them changes on a GPU. The files of the
# GPU kernels come first (pytest keeps the order of the files it is given; a directory would run alphabetically
# and the vision / quant kernels would fall behind the time limit), then every other test file.
# The CUTLASS faces, never run on a GPU before, come last (tests/test_cutlass_faces.py): a fault there leaves the
# process's CUDA context unusable for every test after it.
GPU_FIRST="tests/test_vision_attention.py tests/test_hf_patch.py tests/test_scaled_mm.py tests/test_block_scaled_mm.py
  tests/test_grouped_block_mm.py tests/test_w4a16.py tests/test_quantize.py tests/test_train_context_parallel.py
  tests/test_train_data_curriculum.py tests/test_cutlass_faces.py"
OTHER_TESTS=$(cd "$(dirname "$0")/.." && ls tests/test_*.py | grep -vxF -f <(printf '%s\n' $GPU_FIRST) | tr '\n' ' ')
# The ahead-of-time Hopper compile checks (*_for_hopper_as_launched) run in CI; here they would only spend the
# time limit that the kernels' GPU runs need.
TEST_ARGS=${TEST_ARGS-"-m 'not distributed' -k 'not for_hopper_as_launched' $(echo $GPU_FIRST) $OTHER_TESTS"}
# extra bench arguments, e.g. BENCH_ARGS='--only "N=8192"' to fit a short lease
BENCH_ARGS=${BENCH_ARGS-}
PY=${PYTHON:-python3}

mkdir -p "$R"
R=$(cd "$R" && pwd)
cd "$(dirname "$0")/.."
# mgpt_train is imported from the source tree (nothing is installed on the device)
export PYTHONPATH="$PWD/training${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$R/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
# Stage logs are written to a scratch folder and appended to log.txt as each stage ends (the file limit).
LOGS=$(mktemp -d)
: >"$R/log.txt"
keep_log() { { echo "===== $1"; cat "$LOGS/$1"; echo; } >>"$R/log.txt"; }
# Never let pip look for an index (no network there), nor refuse a system Python (PEP 668).
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi failed)"
note "device_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo "${MGPT_COMMIT:-?}")" \
     "dirty=$([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo yes || echo no)"
timeout 60 "$PY" -m bench --env --device cuda >"$R/env.json" 2>&1 || note "env capture failed (see env.json)"

# ---- CUTLASS headers: the wheel travels in the ignored folder .cutlass/
CUTLASS_DIR=/tmp/cutlass
if ls .cutlass/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --target "$CUTLASS_DIR" .cutlass/*.whl >"$LOGS/build.log" 2>&1 \
    || note "cutlass wheel install failed (see build.log in log.txt)"
  export PYTHONPATH="$CUTLASS_DIR${PYTHONPATH:+:$PYTHONPATH}"
else
  note "no .cutlass/*.whl in the checkout: CUTLASS kernels will be skipped by CMake"
fi

# ---- build: a wheel into a scratch target, then its extension next to the sources, so the checkout
# imports it from the repository root (no editable-install finder, nothing written to site-packages).
# Remove a stale extension first: a failed build must not leave an old one in use.
echo "== build (limit ${BUILD_TIMEOUT}s)"
rm -f mgpt_ops/_C*.so
rm -rf /tmp/mgpt_wheel
start=$SECONDS
CMAKE_BUILD_PARALLEL_LEVEL=16 MGPT_CUDA=on timeout -k 10 "$BUILD_TIMEOUT" \
  "$PY" -m pip install --no-build-isolation --no-deps -v --target /tmp/mgpt_wheel . >>"$LOGS/build.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && cp /tmp/mgpt_wheel/mgpt_ops/_C*.so mgpt_ops/ 2>>"$LOGS/build.log"; then
  note "build: ok in $((SECONDS - start)) s"
else
  note "build: FAILED rc=$rc after $((SECONDS - start)) s (124 = time limit); Triton faces still run. Tail:"
  tail -n 15 "$LOGS/build.log" | tee -a "$SUMMARY"
fi
keep_log build.log
"$PY" -c "import mgpt_ops._ext as e; print('extension loaded:', e.loaded(), '| CUDA kernels:', e.built_with_cuda(), \
'| error:', e.load_error())" 2>&1 | tee -a "$SUMMARY"

# ---- benchmarks (the JSON is rewritten after every case, so a time-out keeps the finished ones)
for family in $BENCH_FAMILIES; do
  limit_var="BENCH_TIMEOUT_$family"
  limit=${!limit_var:-$BENCH_TIMEOUT}
  echo "== bench $family (limit ${limit}s)"
  start=$SECONDS
  eval "timeout -s INT -k 20 $limit $PY -m bench --family $family --device cuda --out $R $BENCH_ARGS" \
    >"$LOGS/bench_$family.log" 2>&1
  rc=$?
  note "bench $family: rc=$rc in $((SECONDS - start)) s (progress in log.txt)"
  [ $rc -ne 0 ] && tail -n 15 "$LOGS/bench_$family.log" | tee -a "$SUMMARY"
  keep_log "bench_$family.log"
done

# ---- toolchain facts that explain extension crashes (which C++ runtime the extension binds to)
{ echo "g++: $(g++ --version 2>/dev/null | head -n 1)"; echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)";
  so=$(ls mgpt_ops/_C*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] && echo "libstdc++ stream symbols defined in $so: $(nm -C --defined-only "$so" | grep -c 'basic_ostream')" \
    && ldd "$so" | grep -E 'stdc|gomp|torch_cpu' ; } >>"$SUMMARY" 2>&1

# ---- GPU tests. SIGINT first: pytest then stops cleanly and still writes the junit XML and its summary.
echo "== tests (limit ${TEST_TIMEOUT}s)"
start=$SECONDS
eval "MGPT_TEST_DEVICE=cuda timeout -s INT -k 20 $TEST_TIMEOUT $PY -m pytest -q -p no:cacheprovider \
  -o faulthandler_timeout=60 --junitxml=$R/tests.xml $TEST_ARGS" >"$LOGS/tests.log" 2>&1
rc=$?
note "tests: rc=$rc in $((SECONDS - start)) s: $(grep -E '(passed|failed|error|no tests ran)' "$LOGS/tests.log" | tail -n 1)"
grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" | head -n 20 | tee -a "$SUMMARY"
keep_log tests.log

# ---- the short table, last
echo >>"$SUMMARY"
if ls "$R"/*_cuda.json >/dev/null 2>&1; then
  "$PY" -m bench --table "$R"/*_cuda.json >>"$SUMMARY" 2>&1
  # the vision goals (vs the fastest baseline, forward vs the matmul peak) are not table columns
  [ -f "$R/vision_cuda.json" ] && "$PY" -m bench.vision_attention "$R/vision_cuda.json" >>"$SUMMARY" 2>&1
  [ -f "$R/train_cuda.json" ] && "$PY" -m bench.train_throughput "$R/train_cuda.json" >>"$SUMMARY" 2>&1
else
  echo "no benchmark results" >>"$SUMMARY"
fi
echo "== summary"
cat "$SUMMARY"
rm -rf "$LOGS"
