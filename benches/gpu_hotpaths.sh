#!/usr/bin/env bash
# Issue 12's GPU figures in one run (< 4 minutes on an H200 from a clean checkout): build the
# extension with its CUDA kernels, the CUDA / Triton correctness tests of the hot-path kernels
# (non-finite reports, pair kernels, tiled knn), `entrodrop bench --calls` at the profiler's
# shapes and [32768, 8192] bf16, the copy bandwidth they are compared with, knn [2048, 4096]
# against cdist + topk, and the profiler's tap overhead on a random 8B-shaped Llama (4 layers;
# bucket alone, then bucket,gaussian_diag,knn,cosine). For a machine with one CUDA GPU where
# `python3` has torch, triton, transformers, cmake, ninja, pybind11 and scikit-build-core.
#
#   OUT=/some/dir bash benches/gpu_hotpaths.sh          # from anywhere; OUT defaults to ./gpu_out
#   OUT=/tmp/x bash benches/gpu_hotpaths.sh --dry-run   # CPU, well under a minute: no build, no
#                                                       # GPU tests, tiny shapes (what CI runs)
#
# Files written to $OUT: env.txt build.log tests_cuda.log tests_triton.log calls.json calls.log
# micro.json bucket_cosine_{auto,triton}.json profile_bucket/ profile_all/ hotpaths.json hotpaths.md summary.txt (SKIPPED_* for a
# part that could not run). A failed build stops the script; any other failed step is recorded
# and the rest still runs (one GPU run must give every number it can); the exit status is
# non-zero if a step failed.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $a (only --dry-run)"; exit 2 ;;
  esac
done
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
T0=$(date +%s)
FAILED=()
log() { echo "[gpu_hotpaths +$(( $(date +%s) - T0 ))s] $*"; }
summary() {
  { echo "commit: $(git rev-parse --short HEAD 2>/dev/null)"; echo "dry run: $DRY"
    echo "failed steps: ${FAILED[*]:-none}"; echo "elapsed: $(( $(date +%s) - T0 ))s"; } | tee "$OUT/summary.txt"
}
skip() { echo "$2" > "$OUT/SKIPPED_$1"; log "skipped $1: $2"; }

log "environment -> $OUT/env.txt"
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  command -v nvidia-smi > /dev/null && nvidia-smi 2>&1 | head -15
  command -v nvcc > /dev/null && nvcc --version | tail -2
  "$PY" -c "
import sys, torch
print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton:', type(e).__name__, e)"
} > "$OUT/env.txt" 2>&1

if [ "$DRY" = "0" ]; then
  DEVICE=cuda
  log "build: pip install --no-build-isolation --no-deps -e . (CUDA kernels ON, sm_90) -> $OUT/build.log"
  export ENTRODROP_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 ${CMAKE_ARGS:-}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
  if ! timeout 180 "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
    log "pip build failed; plain CMake build in place"
    {
      timeout 150 cmake -S . -B build/gpu_hotpaths -G Ninja -DCMAKE_BUILD_TYPE=Release -DENTRODROP_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DPython_EXECUTABLE="$(command -v "$PY")" \
        -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
      timeout 150 cmake --build build/gpu_hotpaths &&
      cp build/gpu_hotpaths/_C*.so src/entrodrop_fast/
    } >> "$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -40 "$OUT/build.log"; FAILED+=(build); summary; exit 1; }
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$PY" -c "from entrodrop_fast import _ext; import sys; print('cuda kernels:', _ext.has_cuda()); sys.exit(0 if _ext.has_cuda() else 1)"; then
    log "BUILD FAILED: no CUDA kernels in the extension"; tail -40 "$OUT/build.log"; FAILED+=(build); summary; exit 1
  fi
  log "tests: CUDA kernels, tiled knn, dispatch -> $OUT/tests_cuda.log"
  timeout 120 "$PY" -m pytest -q -x -m "not slow" -p no:cacheprovider tests/test_cuda_backend.py tests/test_gpu_dispatch.py tests/test_backends.py -k "not triton" \
    > "$OUT/tests_cuda.log" 2>&1 || FAILED+=(tests_cuda)
  tail -5 "$OUT/tests_cuda.log"
  log "tests: Triton bucket / moments compiled on the GPU -> $OUT/tests_triton.log"
  TRITON_INTERPRET=0 timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_bucket_cosine.py -k "bucket or moments" \
    > "$OUT/tests_triton.log" 2>&1 || FAILED+=(tests_triton)
  tail -3 "$OUT/tests_triton.log"
  CALL_SHAPES="1x256x4096,8x256x4096,128x256x4096,8x256x576,32768x4096,32768x8192"
  CALL_ARGS=(--repeat 7)
  MICRO_ARGS=(--device cuda)
  PROFILE_ARGS=(--random-llama 4 --dtype bf16 --device cuda --batch-size 8 --samples 16 --reps 3 --paper-reps 0)
  BC_ARGS=(--device cuda --rounds 15)
  BC_INTERPRET=0
  STEP=120
else
  DEVICE=cpu
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  log "dry run: no build, no GPU tests; tiny shapes on the CPU"
  "$PY" -c "from entrodrop_fast import _ext; print('extension:', _ext.available(), 'cuda kernels:', _ext.has_cuda())"
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_dispatch.py > "$OUT/tests_cuda.log" 2>&1 || FAILED+=(tests_cuda)
  tail -1 "$OUT/tests_cuda.log"
  CALL_SHAPES="2x32x64,96x40"
  CALL_ARGS=(--repeat 2 --estimators bucket,gaussian_diag,delta_bucket)
  MICRO_ARGS=(--device cpu --dry-run)
  PROFILE_ARGS=(--random-llama 2 --llama-shape 64,128,4,2 --dtype fp32 --device cpu --batch-size 2 --samples 2 --seq-len 32
                --reps 1 --paper-reps 0)
  BC_ARGS=(--device cpu --rounds 2 --shapes 2x32x64)
  BC_INTERPRET=1  # Triton's kernels on the CPU: its interpreter
  STEP=60
fi

log "calls: entrodrop bench --calls --device $DEVICE --shapes $CALL_SHAPES bf16 -> $OUT/calls.json"
rm -f "$OUT/calls.json"
timeout "$STEP" "$PY" -m entrodrop_fast bench --calls --device "$DEVICE" --shapes "$CALL_SHAPES" --dtypes bf16 "${CALL_ARGS[@]}" \
  --json "$OUT/calls.json" > "$OUT/calls.log" 2>&1 || FAILED+=(calls)
tail -3 "$OUT/calls.log"

log "copy bandwidth, knn against cdist + topk -> $OUT/micro.json"
timeout "$STEP" "$PY" benches/gpu_hotpaths.py micro --out "$OUT" "${MICRO_ARGS[@]}" > "$OUT/micro.log" 2>&1 || FAILED+=(micro)

for be in auto triton; do
  log "bucket + cosine at a block: one fused call against the two, --backend $be -> $OUT/bucket_cosine_$be.json"
  TRITON_INTERPRET=$BC_INTERPRET timeout "$STEP" "$PY" benches/bucket_cosine.py "${BC_ARGS[@]}" --backend "$be" --json "$OUT/bucket_cosine_$be.json" \
    > "$OUT/bucket_cosine_$be.log" 2>&1 || FAILED+=("bucket_cosine_$be")
  tail -4 "$OUT/bucket_cosine_$be.log"
done

if grep -q -- "--random-llama" benches/bench_profile.py && "$PY" -c "import transformers" 2> /dev/null; then
  for spec in "bucket:bucket" "all:bucket,gaussian_diag,knn,cosine"; do
    name="${spec%%:*}"; methods="${spec#*:}"
    log "tap overhead, random Llama, --methods $methods -> $OUT/profile_$name/"
    timeout "$STEP" "$PY" benches/bench_profile.py "${PROFILE_ARGS[@]}" --methods "$methods" --out "$OUT/profile_$name" \
      > "$OUT/profile_$name.log" 2>&1 || FAILED+=("profile_$name")
    tail -4 "$OUT/profile_$name.log"
  done
else
  skip profile "tap overhead: benches/bench_profile.py has no --random-llama / --methods here (branch taps) or transformers is missing"
fi

log "report -> $OUT/hotpaths.json, $OUT/hotpaths.md"
"$PY" benches/gpu_hotpaths.py report --out "$OUT" || FAILED+=(report)
summary
[ ${#FAILED[@]} -eq 0 ]
