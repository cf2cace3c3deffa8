#!/usr/bin/env bash
# Big-model figures of the streaming profiler on a GPU (issue 13, item 4), about 5 minutes on an
# H200 (+ the build):
#   1. a random 32-layer checkpoint with Llama-3-8B layer shapes (D 4096, MLP 14336, 8 KV heads,
#      vocabulary 128256; 16 GB bf16, 4 GB shards), and
#   2. a random 4-layer checkpoint with Mixtral-8x7B layer shapes (8 experts of 14336, top-2;
#      12 GB bf16), stored per expert as published (block_sparse_moe.experts.N.w1/w2/w3),
# each profiled by `entrodrop profile` in memory, with --streaming and with --max-memory 8GB,
# all with --device cuda --dtype bf16 on 128 x 256 tokens (bucket). Every run is a child process
# reporting torch.cuda.max_memory_allocated, the profile's seconds (and per layer), its wall
# time, and the ratios to the in-memory run; the README's formula is evaluated beside them.
#
#   OUT=/some/dir bash benches/gpu_bigmodel.sh             # from the repository root; OUT defaults to ./gpu_bigmodel_out
#   OUT=/some/dir bash benches/gpu_bigmodel.sh --dry-run   # tiny shapes on the CPU (what CI can run), no build
#
# Environment: PYTHON (default python3), SKIP_INSTALL=1 (the package is installed already),
# CKPT_DIR (where the checkpoints are written, on a local disk with 20 GB free; default
# ./build/bigmodel_ckpt, removed at the end), BIGMODEL_ARGS (more arguments for
# benches/bigmodel.py, e.g. "--models llama3-8b-shapes" or "--layout both").
#
# Files written to $OUT: install.log bigmodel.log bigmodel.json bigmodel.md summary.txt
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_bigmodel_out}"
PY="${PYTHON:-python3}"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_bigmodel.sh: unknown argument $arg (use --dry-run, or none)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
CKPT_DIR="${CKPT_DIR:-./build/bigmodel_ckpt}/run-$$"  # a directory of its own: removed at the end
T0=$(date +%s)
FAILED=()
log() { echo "[gpu_bigmodel +$(( $(date +%s) - T0 ))s] $*"; }
summary() {
  { echo "commit: $(git rev-parse --short HEAD 2>/dev/null)"; echo "mode: $([ $DRY = 1 ] && echo dry-run || echo gpu)";
    echo "failed steps: ${FAILED[*]:-none}"; echo "elapsed: $(( $(date +%s) - T0 ))s"; } | tee "$OUT/summary.txt"
}
trap 'rm -rf "$CKPT_DIR"' EXIT

if [ "$DRY" = 1 ]; then
  PRESET=(--preset dry-run --device cpu --threads "${THREADS:-2}")
  LIMIT=900
  # no install: the checkout's package when its extension is built in place, else the installed one
  if compgen -G "src/entrodrop_fast/_C*.so" > /dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
  echo "dry run: no install (PYTHONPATH=${PYTHONPATH:-})" > "$OUT/install.log"
else
  PRESET=(--preset h200 --device cuda)
  LIMIT=540
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device visible to torch: run with --dry-run for the CPU mode"; FAILED+=(no_gpu); summary; exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1
  if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    log "pip install . -> $OUT/install.log"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 ${CMAKE_ARGS:-}"
    if ! timeout 240 "$PY" -m pip install --no-build-isolation --no-deps . > "$OUT/install.log" 2>&1; then
      log "INSTALL FAILED"; tail -30 "$OUT/install.log"; FAILED+=(install); summary; exit 1
    fi
  fi
fi
"$PY" -c "import entrodrop_fast, transformers, torch; print('entrodrop_fast', entrodrop_fast.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)" \
  || { FAILED+=(import); summary; exit 1; }

mkdir -p "$CKPT_DIR"
log "benches/bigmodel.py ${PRESET[*]} ${BIGMODEL_ARGS:-} (checkpoints in $CKPT_DIR) -> $OUT/bigmodel.log"
# shellcheck disable=SC2086
timeout "$LIMIT" "$PY" benches/bigmodel.py "${PRESET[@]}" --dir "$CKPT_DIR" --out "$OUT" ${BIGMODEL_ARGS:-} 2>&1 | tee "$OUT/bigmodel.log"
RC=${PIPESTATUS[0]}
if [ "$RC" != 0 ]; then
  log "bigmodel.py exited $RC$([ "$RC" = 124 ] && echo " (over ${LIMIT}s)"); bigmodel.json / bigmodel.md hold the models finished before"
  FAILED+=(bigmodel)
fi
[ -s "$OUT/bigmodel.md" ] || FAILED+=(no_table)
summary
[ ${#FAILED[@]} = 0 ]
