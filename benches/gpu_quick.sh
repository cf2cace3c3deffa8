#!/usr/bin/env bash
# Short GPU check of the CUDA moments / bucket kernels (< 3 minutes on an H200): build with the
# CUDA kernels for sm_90, the CUDA moments/bucket tests, an exactness check of the kernel paths
# the tests do not reach (16-byte two-pass bucket, fused bucket entropy, big bf16 sample), and
# the benchmark without the Triton block sweep.
#
#   OUT=/some/dir bash benches/gpu_quick.sh      # from the repository root; OUT defaults to ./gpu_out
#
# Files written to $OUT (6): build.log tests_cuda.log exact.log bench.json bench.md summary.txt
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
T0=$(date +%s)
FAILED=()
log() { echo "[gpu_quick +$(( $(date +%s) - T0 ))s] $*"; }
summary() { { echo "commit: $(git rev-parse --short HEAD 2>/dev/null)"; echo "failed steps: ${FAILED[*]:-none}"; echo "elapsed: $(( $(date +%s) - T0 ))s"; } | tee "$OUT/summary.txt"; }

log "build (CUDA kernels ON, sm_90) -> $OUT/build.log"
export ENTRODROP_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 ${CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
if ! timeout 150 "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
  log "pip build failed; plain CMake build in place"
  {
    timeout 120 cmake -S . -B build/gpu_quick -G Ninja -DCMAKE_BUILD_TYPE=Release -DENTRODROP_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DPython_EXECUTABLE="$(command -v "$PY")" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
    timeout 120 cmake --build build/gpu_quick &&
    cp build/gpu_quick/_C*.so src/entrodrop_fast/
  } >> "$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -40 "$OUT/build.log"; FAILED+=(build); summary; exit 1; }
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
grep -E "CUDA kernels" "$OUT/build.log" | head -2
if ! "$PY" -c "from entrodrop_fast import _ext; import sys; print('cuda kernels:', _ext.has_cuda()); sys.exit(0 if _ext.has_cuda() else 1)"; then
  log "BUILD FAILED: no CUDA kernels in the extension"; FAILED+=(build); summary; exit 1
fi

log "tests: pytest -m cuda tests/test_cuda_backend.py tests/test_backends.py -k 'moments or bucket' -> $OUT/tests_cuda.log"
timeout 90 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda_backend.py tests/test_backends.py -k "moments or bucket" > "$OUT/tests_cuda.log" 2>&1 || FAILED+=(tests_cuda)
grep -E "FAILED|Error|passed|failed" "$OUT/tests_cuda.log" | tail -15

log "exactness of the paths the tests do not reach -> $OUT/exact.log"
timeout 90 "$PY" - > "$OUT/exact.log" 2>&1 <<'PYEOF' || FAILED+=(exact)
import sys, torch
sys.path.insert(0, "tests")
from entrodrop_fast.ops import reference as R
from entrodrop_fast.ops import cuda_backend as cb
bad = 0
def ref_counts(x, f, mask, bins):
    y = R._y(x, f); out = []
    for b in range(y.shape[0]):
        idx = R.bucket_bin_index(R._rows(y, mask, b), bins)
        c = torch.zeros(y.shape[2], bins, dtype=torch.int64, device=y.device)
        c.scatter_add_(1, idx.t(), torch.ones_like(idx.t())); out.append(c)
    return torch.stack(out)
def report(name, ok, extra=""):
    global bad
    bad += 0 if ok else 1
    print(f"{'ok  ' if ok else 'FAIL'} {name} {extra}", flush=True)
g = torch.Generator(device="cuda").manual_seed(0)
for dt in (torch.bfloat16, torch.float16, torch.float32):
    for (B, T, D) in [(2, 100, 4096), (3, 256, 1024), (1, 3000, 512), (2, 777, 4096)]:
        x = (torch.randn(B, T, D, generator=g, device="cuda") * 2 + 0.5).to(dt)
        x[..., 0] = 1.5; x[..., 5] = x[..., 5] * 100 + 3000
        f = torch.randn(B, T, D, generator=g, device="cuda").to(dt)
        m = torch.rand(B, T, generator=g, device="cuda") > 0.3; m[:, 0] = True
        for tag, ff, mm in [("x", None, None), ("x+f masked", f, m)]:
            ref = ref_counts(x, ff, mm, 80)
            for fused in ((False, True) if T <= 256 else (False,)):
                got = cb.bucket_counts(x, ff, mm, 80, fused=fused).long()
                report(f"counts {dt} {(B,T,D)} {tag} fused={fused}", torch.equal(got, ref), f"(mismatches {(got != ref).sum().item()})")
            for pe in (False, True):
                r = R.bucket(x, ff, mm, 80, pe); c = cb.bucket(x, ff, mm, 80, pe)
                err = ((r - c).abs() / (r.abs() + 1e-12)).max().item()
                report(f"entropy {dt} {(B,T,D)} {tag} paper={pe}", err < 1e-10, f"(max rel err {err:.2e})")
            rm, cm = R.moments(x, ff, mm), cb.moments(x, ff, mm)
            e2 = ((rm["m2"] - cm["m2"].double()).abs() / (rm["m2"].abs() + 1e-9)).max().item()
            ok = e2 < 1e-5 and torch.equal(rm["min"], cm["min"]) and torch.equal(rm["max"], cm["max"]) and torch.equal(rm["count"], cm["count"])
            report(f"moments {dt} {(B,T,D)} {tag}", ok, f"(m2 max rel err {e2:.2e})")
# the big bf16 sample of the benchmark: counts exact, moments to 1e-5
x = torch.randn(1, 32768, 8192, generator=g, device="cuda"); x[..., 1] = x[..., 1] * 50 + 3000.0; x[..., 4096] *= 400.0
x = x.to(torch.bfloat16)
rm, cm = R.moments(x), cb.moments(x)
e2 = ((rm["m2"] - cm["m2"].double()).abs() / rm["m2"].abs()).max().item()
report("moments big bf16", e2 < 1e-5 and torch.equal(rm["min"], cm["min"]) and torch.equal(rm["max"], cm["max"]), f"(m2 max rel err {e2:.2e})")
del rm, cm; torch.cuda.empty_cache()
ref = ref_counts(x, None, None, 80); got = cb.bucket_counts(x, None, None, 80).long()
report("counts big bf16", torch.equal(got, ref), f"(mismatches {(got != ref).sum().item()})")
print("exact: FAILURES", bad) if bad else print("exact: all ok")
sys.exit(1 if bad else 0)
PYEOF
tail -4 "$OUT/exact.log"; grep -c FAIL "$OUT/exact.log"

log "benchmark: benches/bench_gpu.py --quick -> $OUT/bench.json, $OUT/bench.md"
timeout 100 "$PY" benches/bench_gpu.py --quick --out "$OUT" || FAILED+=(bench)
[ -f "$OUT/bench.md" ] && grep -E "cuda|copy|x.sum" "$OUT/bench.md"
summary
[ ${#FAILED[@]} -eq 0 ]
