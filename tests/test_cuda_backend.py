"""CUDA kernels (cuda_backend) and Triton kernels (triton_backend) against the reference, on GPU:
what only these have (sizes and kernel paths of a GPU: many bins, streams, the big input, the
tiled knn with TF32, the pair and tile kernels). What every backend must do is in
test_backends.py, the conformance suite (its cuda and triton cases run on the GPU too).

Skipped without a CUDA device. benches/gpu_check.sh runs this on the lent GPU machine.
"""

import importlib.util
import os

import helpers as H
import pytest
import torch
from helpers import DTYPES, assert_close, llm_like

from entrodrop_fast.ops import backends as B
from entrodrop_fast.ops import reference as ref_ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _backends():
    out = [pytest.param("cuda", id="cuda")]
    has_triton = importlib.util.find_spec("triton") is not None and os.environ.get(
        "TRITON_INTERPRET", "0"
    ) in ("", "0")
    out.append(
        pytest.param(
            "triton",
            id="triton",
            marks=pytest.mark.skipif(
                not has_triton, reason="triton missing (or TRITON_INTERPRET=1)"
            ),
        )
    )
    return out


def backend(name):
    if name == "cuda":
        import entrodrop_fast.ops.cuda_backend as mod
    else:
        import entrodrop_fast.ops.triton_backend as mod
    ok, why = mod.available()
    if not ok:
        pytest.skip(f"{name} backend unavailable: {why}")
    return mod


def counts_fn(name):
    if name == "cuda":
        from entrodrop_fast.ops.cuda_backend import bucket_counts
    else:
        from entrodrop_fast.ops.triton.bucket import bucket_counts
    return bucket_counts


def make(shape, dtype, seed=0, strided=False):
    return H.make(shape, dtype, "cuda", seed, strided)


def make_mask(shape, seed=0):
    return H.make_mask(shape, "cuda", seed)


ref_counts = H.ref_counts
bad_channels = H.bad_channels
same_bits = H.same_bits


def check_moments(ref, out, name=""):
    assert out["count"].device.type == "cuda"
    H.check_moments(ref, out, H.TOLS["cuda"], name)


@pytest.mark.parametrize("name", _backends())
def test_available(name):
    mod = backend(name)
    assert "cuda" in mod.devices()


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("paper_exact", [False, True])
def test_bucket_entropy(name, paper_exact):
    mod = backend(name)
    shape = (3, 301, 130)
    x, f, m = make(shape, torch.bfloat16), make(shape, torch.bfloat16, seed=2), make_mask(shape)
    for args in [(x, None, None), (x, f, m)]:
        assert_close(
            ref_ops.bucket(*args, 80, paper_exact), mod.bucket(*args, 80, paper_exact), 1e-12, 1e-12
        )


@pytest.mark.parametrize("name", _backends())
def test_bucket_many_bins(name):
    """More bins than fit the shared-memory counters: the global-memory path."""
    backend(name)
    shape = (1, 700, 70)
    x = make(shape, torch.float16)
    assert torch.equal(counts_fn(name)(x, None, None, 2500).long(), ref_counts(x, None, None, 2500))


def test_triton_cosine_knn():
    mod = backend("triton")
    shape = (3, 65, 300)
    x, o, m = make(shape, torch.bfloat16), make(shape, torch.bfloat16, seed=4), make_mask(shape)
    for fused in (True, False):
        r, t = ref_ops.cosine(x, o, m, fused), mod.cosine(x, o, m, fused)
        assert_close(r[0], t[0], 1e-5, 1e-6)
        assert_close(r[1], t[1], 0)
    xk = llm_like(300, 64, seed=3, outliers=False).cuda()
    assert_close(
        ref_ops.knn_kth_distance(xk, 25),
        B.kernel("triton", "cuda", "knn_kth_distance")(xk, 25),
        1e-5,
        1e-6,
    )


def test_stream_ordering():
    """Kernels run on the caller's current stream: results are right when read on that stream."""
    mod = backend("cuda")
    s = torch.cuda.Stream()
    x = make((1, 4096, 512), torch.bfloat16)
    ref = ref_ops.moments(x)
    with torch.cuda.stream(s):
        y = x * 1  # produced on s
        out = mod.moments(y, None, None)
    s.synchronize()
    check_moments(ref, out, "stream")


@pytest.mark.slow
@pytest.mark.parametrize("name", _backends())
def test_big_bf16(name):
    """[32768, 8192] bf16 once: moments to 1e-5 and bucket counts exact (80 bins)."""
    mod = backend(name)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 32768, 8192, generator=g, device="cuda")
    x[..., 1] = x[..., 1] * 50 + 3000.0
    x[..., 4096] *= 400.0
    x = x.to(torch.bfloat16)
    check_moments(ref_ops.moments(x), mod.moments(x, None, None), "big")
    ref = ref_counts(x, None, None, 80)
    assert torch.equal(counts_fn(name)(x, None, None, 80).long(), ref)
    del ref
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,k", [(26, 5, 25), (257, 577, 25), (2048, 64, 25), (700, 4096, 7)])
def test_cuda_knn_tiled(dtype, N, D, k):
    """The cuda backend's knn_kth_distance (tiled cuBLAS GEMMs + exact fp64 band) to 1e-9."""
    backend("cuda")
    knn = B.kernel("cuda", "cuda", "knn_kth_distance")  # (ops/backends.py: the tiled GEMM search)
    x = llm_like(N, D, seed=N, dtype=dtype)
    r = x.double()
    want = (
        torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist")
        .fill_diagonal_(float("inf"))
        .kthvalue(k, 1)
        .values
    )
    assert_close(want, knn(x.cuda(), k), 1e-9)
    assert_close(want, knn(x.cuda()[:, :].t().contiguous().t(), k), 1e-9)  # column-major
    dup = x[: N // 4].repeat(4, 1)
    rd = dup.double()
    want = (
        torch.cdist(rd, rd, compute_mode="donot_use_mm_for_euclid_dist")
        .fill_diagonal_(float("inf"))
        .kthvalue(min(k, dup.shape[0] - 1), 1)
        .values
    )
    assert_close(want, knn(dup.cuda(), min(k, dup.shape[0] - 1)), 1e-9)


def test_cuda_knn_tf32_allowed():
    """With TF32 GEMMs allowed the band widens; the radii stay exact."""
    backend("cuda")
    knn = B.kernel("cuda", "cuda", "knn_kth_distance")  # (ops/backends.py: the tiled GEMM search)
    x = llm_like(1000, 1024, seed=3, dtype=torch.bfloat16)
    r = x.double()
    want = (
        torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist")
        .fill_diagonal_(float("inf"))
        .kthvalue(25, 1)
        .values
    )
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = knn(x.cuda(), 25)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_close(want, got, 1e-9)


# ------------------------------------------------------------------ non-finite reports, pairs

NAN, INF = float("nan"), float("inf")
REPORT_CASES = ["clean", "nan_x", "inf_x", "nan_f", "inf_f", "inf_both", "overflow", "masked"]
# (B, T, D): the fused single-read bucket (T <= 256, 16-byte rows), the two-pass kernels
# (T > 256), and the generic scalar path (D odd)
REPORT_SHAPES = [(3, 37, 64), (2, 600, 128), (2, 300, 21)]


def bad_data(dtype, case, shape):
    """x, f [B, T, D] on the GPU with the bad values of `case`, and a mask leaving token (b1, 9)
    and every 5th token of sample B-1 out."""
    B, T, D = shape
    b1 = min(1, B - 1)  # "sample 1" (0 when there is one sample)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g)
    f = 0.5 * torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[b1, 9] = False
    mask[B - 1, ::5] = False
    big = 3e38 if dtype != torch.float16 else 6e4
    if case == "nan_x":
        x[b1, 5, 7] = NAN
    elif case == "inf_x":
        x[0, 0, 0] = INF
        x[B - 1, T - 1, D - 1] = -INF
    elif case == "nan_f":
        f[b1, T - 2, 7] = NAN
    elif case == "inf_f":
        f[0, 3, 4] = -INF
    elif case == "inf_both":
        x[0, 4, 2] = INF
        f[0, 4, 2] = -INF
    elif case == "overflow":  # finite x and f whose fp32 sum overflows (fp16: stays finite)
        x[b1, 3, 2] = big
        f[b1, 3, 2] = big
    elif case == "masked":  # bad values only in masked-out tokens
        x[b1, 9, 3] = NAN
        f[b1, 9, 4] = INF
        x[B - 1, 5, 0] = big
        f[B - 1, 5, 0] = big
    return x.to(dtype).cuda(), f.to(dtype).cuda(), mask.cuda()


@pytest.mark.parametrize("shape", REPORT_SHAPES, ids=str)
@pytest.mark.parametrize("case", REPORT_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernels_report_exactly_the_bad_channels(dtype, case, shape):
    mod = backend("cuda")
    x, f, mask = bad_data(dtype, case, shape)
    for ff, m in ((None, None), (f, None), (f, mask)):
        y = x.float() if ff is None else x.float() + ff.float()
        bad = bad_channels(y, m)
        clean = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
        for bins in (20, 2500):  # shared-memory and global counters
            h = mod.bucket(x, ff, m, bins, False)
            assert torch.equal(h.isnan(), bad), (
                f"bucket {bins}: NaN at {h.isnan().nonzero().tolist()}, want "
                f"{bad.nonzero().tolist()}"
            )
            assert_close(
                ref_ops.bucket(clean, None, m, bins)[~bad],
                h[~bad],
                1e-12,
                1e-12,
                name=f"bucket {bins}",
            )
            c = mod.bucket_counts(x, ff, m, bins).long()
            assert torch.equal(c[..., 0] < 0, bad), "counts: negative bin 0 marks the bad channels"
            assert torch.equal(c[~bad], ref_counts(clean, None, m, bins)[~bad])
        mo = mod.moments(x, ff, m)
        for k in ("mean", "m2", "min", "max"):
            assert torch.equal(mo[k].isnan(), bad), f"moments {k}"
        ref = ref_ops.moments(clean, None, m)
        ok = ~bad & (clean.abs().amax(1) < 1e18)
        assert_close(ref["m2"][ok], mo["m2"][ok], 1e-5, 1e-30, name="m2")
        assert torch.equal(ref["min"][~bad], mo["min"][~bad]) and torch.equal(
            ref["max"][~bad], mo["max"][~bad]
        )
        assert_close(ref["count"], mo["count"], 0)


@pytest.mark.parametrize("shape", REPORT_SHAPES + [(1, 5000, 256)], ids=str)
@pytest.mark.parametrize("case", ["clean", "nan_x", "overflow", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_pair_kernels_equal_the_single_kernels(dtype, case, shape):
    mod = backend("cuda")
    x, f, mask = bad_data(dtype, case, shape)
    views = {
        "contiguous": (x, f),
        "sliced": (x[:, ::2, :], f[:, 1::2, :]),
        "misaligned f": (x[:, :, 1:], f[:, :, 1:])
        if shape[2] % 8
        else (x, f.transpose(1, 2).contiguous().transpose(1, 2)),
    }
    for name, (xv, fv) in views.items():
        for m in (None, mask[:, : xv.shape[1]]):
            for bins in (20, 300):
                hy, hx = mod.bucket_pair(xv, fv, m, bins, False)
                assert same_bits(hy, mod.bucket(xv, fv, m, bins, False)), f"{name} bucket Y"
                assert same_bits(hx, mod.bucket(xv, None, m, bins, False)), f"{name} bucket X"
            my, mx = mod.moments_pair(xv, fv, m)
            for got, want in ((my, mod.moments(xv, fv, m)), (mx, mod.moments(xv, None, m))):
                for k in want:
                    assert same_bits(got[k].double(), want[k].double()), f"{name} moments {k}"


def _outcome(fn):
    """(result, error message, warning messages) of one call."""
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            res, err = fn(), None
        except ValueError as e:
            res, err = None, str(e)
    return res, err, [str(w.message) for w in rec]


@pytest.mark.parametrize("policy", ["raise", "omit"])
@pytest.mark.parametrize("call", ["entropy", "delta"])
@pytest.mark.parametrize("method", ["bucket", "gaussian_diag"])
@pytest.mark.parametrize("case", REPORT_CASES)
def test_cuda_api_defers_validation_to_the_kernels(method, call, policy, case, monkeypatch):
    """On CUDA tensors the API skips its NaN/Inf pass for bucket / gaussian_diag (clean input
    reads no pre-pass) and its results, errors and warnings are those of the explicit check."""
    import entrodrop_fast as ef
    from entrodrop_fast.ops import api, cuda_backend

    backend("cuda")
    x, f, mask = bad_data(torch.bfloat16, case, (3, 300, 64))
    if call == "entropy":

        def run():
            return ef.entropy(x, method, f, mask=mask, nan_policy=policy)
    else:

        def run():
            return ef.delta_entropy(x, f, method, mask=mask, nan_policy=policy)

    calls = []
    real = api._nonfinite_tokens
    monkeypatch.setattr(api, "_nonfinite_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = _outcome(run)
    if case == "clean":
        assert not calls, "clean input read by the API's pre-pass"
    monkeypatch.setattr(cuda_backend, "REPORTS_NONFINITE", {})  # the explicit check, as before
    monkeypatch.setattr(cuda_backend, "PAIRS", {})
    want = _outcome(run)
    assert got[1] == want[1] and got[2] == want[2], f"{got[1:]} vs {want[1:]}"
    if want[0] is not None:
        assert_close(want[0], got[0], 1e-12, 1e-12)


@pytest.mark.parametrize("case", ["clean", "nan_x", "inf_f", "overflow", "masked"])
@pytest.mark.parametrize("shape", [(3, 37, 64), (2, 256, 200), (1, 1, 8), (5, 129, 4096)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bucket_tile_kernel_equals_the_register_kernel(dtype, shape, case, monkeypatch):
    """bucket_tile (shared-memory tile, owner threads, no atomics): counts exact against the
    reference and H_d bit for bit those of bucket_fused, NaN reports included."""
    from entrodrop_fast.ops import cuda_backend as cb

    backend("cuda")
    x, f, mask = (
        bad_data(dtype, case, shape)
        if shape[1] > 9
        else (make(shape, dtype), make(shape, dtype, seed=1), None)
    )
    x[..., 0] = 1.5  # a constant channel
    for ff, m in ((None, None), (f, None), (f, mask)):
        for bins in (1, 20, 128):
            for paper_exact in (False, True):
                monkeypatch.setattr(cb, "FUSED_KERNEL", "registers")
                want = cb.bucket(x, ff, m, bins, paper_exact)
                want_c = cb.bucket_counts(x, ff, m, bins)
                monkeypatch.setattr(cb, "FUSED_KERNEL", "tile")
                assert cb._fused_ok(x, cb._vec(x, ff), bins)
                assert same_bits(cb.bucket(x, ff, m, bins, paper_exact), want), f"H_d bins={bins}"
                assert torch.equal(cb.bucket_counts(x, ff, m, bins), want_c), f"counts bins={bins}"
            y = x.float() if ff is None else x.float() + ff.float()
            bad = bad_channels(y, m)
            clean = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
            assert torch.equal(
                cb.bucket_counts(x, ff, m, bins).long()[~bad],
                ref_counts(clean, None, m, bins)[~bad],
            )
