#!/usr/bin/env bash
# Issue 12's CPU figures in one run, on the installed package (bash scripts/setup.sh first):
# the public calls with their defaults beside validate=False at the profiler's shapes
# (`entrodrop bench --calls`), knn against cdist + topk, every estimator with one core busy
# (at the same priority, and with the calls at nice 10 below the busy process),
# and the profiler's tap overhead on the built-in SmolLM2 (bucket alone, then
# bucket,gaussian_diag,knn,cosine); then benches/cpu_hotpaths.py checks the targets.
# About 6 minutes on a 2-core machine. Run it on a machine that is otherwise idle: every figure
# is a ratio of timings interleaved in the same run, but a busy machine still skews them.
#
#   OUT=DIR bash benches/cpu_hotpaths.sh      # OUT defaults to ./cpu_hotpaths_out
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./cpu_hotpaths_out}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
"$PY" -m entrodrop_fast bench --calls --json "$OUT/calls.json" --overwrite | tee "$OUT/calls.md"
"$PY" benches/knn_vs_cdist.py 60 --skip-large --json "$OUT/knn.json" | tee "$OUT/knn.log"
"$PY" benches/bucket_cosine.py --json "$OUT/bucket_cosine.json" | tee "$OUT/bucket_cosine.log"
"$PY" benches/under_load.py --json "$OUT/under_load.json" | tee "$OUT/under_load.log"
"$PY" benches/under_load.py --nice 10 --json "$OUT/under_load_nice10.json" | tee "$OUT/under_load_nice10.log"
"$PY" benches/bench_profile.py --paper-reps 1 --out "$OUT/profile_bucket" | tee "$OUT/profile_bucket.log"
"$PY" benches/bench_profile.py --methods bucket,gaussian_diag,knn,cosine --paper-reps 0 \
    --out "$OUT/profile_all" | tee "$OUT/profile_all.log"
"$PY" benches/cpu_hotpaths.py "$OUT"
