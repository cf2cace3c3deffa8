"""Triton backend against the torch reference, under TRITON_INTERPRET=1 on CPU.

On a GPU machine run with TRITON_INTERPRET=0 to test the compiled kernels on CUDA
tensors instead (benches/gpu_check.sh does). Small odd shapes: the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import DTYPES, assert_close, llm_like  # noqa: E402

import entrodrop_fast as ef  # noqa: E402
from entrodrop_fast.ops import api  # noqa: E402
from entrodrop_fast.ops import reference as ref_ops  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"),
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytestmark.append(pytest.mark.skip(reason="TRITON_INTERPRET=0 and no CUDA device"))
DEV = "cpu" if INTERPRET else "cuda"

SHAPES = [(1, 2, 1), (1, 3, 5), (1, 33, 65), (3, 17, 9)]
SMALL = dict(block_t=16, block_d=32, splits=3)  # several splits and channel blocks on tiny shapes


def tri():
    import entrodrop_fast.ops.triton_backend as tb

    return tb


def make(shape, dtype, seed=0, strided=False):
    x = llm_like(*shape, seed=seed, dtype=dtype).to(DEV)
    if strided:  # channel stride 2, samples interleaved between tokens: strides (2D, 2BD, 2)
        B, T, D = shape
        buf = torch.zeros(T, B, 2 * D, dtype=dtype, device=DEV)  # built on DEV: .to() would copy it contiguous
        buf[..., ::2] = x.transpose(0, 1)
        x = buf.transpose(0, 1)[..., ::2]
    return x


def make_mask(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape[:2], generator=g) > 0.4
    m[:, 0] = True
    m[:, -1] = True
    return m.to(DEV)


def ref_counts(x, f, mask, bins):
    y = ref_ops._y(x, f)
    out = []
    for b in range(y.shape[0]):
        idx = ref_ops.bucket_bin_index(ref_ops._rows(y, mask, b), bins)  # (N, D)
        c = torch.zeros(y.shape[2], bins, dtype=torch.int64, device=y.device)
        c.scatter_add_(1, idx.t(), torch.ones_like(idx.t()))
        out.append(c)
    return torch.stack(out)  # (B, D, bins)


def check_moments(ref, out, name=""):
    assert set(out) >= {"count", "mean", "m2", "min", "max"}
    assert_close(ref["count"], out["count"], 0, name=f"{name} count")
    assert_close(ref["m2"], out["m2"], 1e-5, 1e-9, name=f"{name} m2")
    assert_close(ref["min"], out["min"], 0, name=f"{name} min")
    assert_close(ref["max"], out["max"], 0, name=f"{name} max")
    # the mean agrees to 1e-5 relative, or to 1e-6 of the channel's spread when it is near 0
    std = (ref["m2"] / ref["count"][:, None]).sqrt().cpu()
    err = (ref["mean"].cpu() - out["mean"].double().cpu()).abs()
    tol = 1e-5 * ref["mean"].abs().cpu() + 1e-6 * std + 1e-30
    assert bool((err <= tol).all()), f"{name} mean: worst excess {(err - tol).max():.3e}"


def test_available_and_devices():
    ok, why = tri().available()
    assert ok, why
    assert "cuda" in tri().devices()
    if INTERPRET:
        assert "cpu" in tri().devices()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments(shape, dtype, nan_empty):
    from entrodrop_fast.ops.triton.moments import moments

    x, f, m = make(shape, dtype), make(shape, dtype, seed=1), make_mask(shape)
    check_moments(ref_ops.moments(x), moments(x, **SMALL), "x")
    check_moments(ref_ops.moments(x, f, m), moments(x, f, m, **SMALL), "x+f masked")


def test_moments_backend_defaults_strided(nan_empty):
    shape = (2, 37, 70)
    x, f, m = make(shape, torch.float32, strided=True), make(shape, torch.bfloat16, seed=3), make_mask(shape, 1)
    assert x.stride(-1) != 1
    check_moments(ref_ops.moments(x), tri().moments(x, None, None), "strided")
    check_moments(ref_ops.moments(x, f.float(), m), tri().moments(x, f.float(), m[:, :]), "strided x+f masked")
    mm = torch.ones(2, 2 * shape[1], dtype=torch.bool, device=DEV)[:, ::2]  # mask with t stride 2
    mm[0, 5] = False
    check_moments(ref_ops.moments(x, None, mm), tri().moments(x, None, mm), "strided mask")


def test_moments_large_offset_channels():
    """Channels 1e4x larger than the rest, with a large mean: the fp32 kernel keeps 1e-5."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 300, 24, generator=g)
    x[..., 3] = x[..., 3] * 1e4 + 3e5
    x[..., 7] = x[..., 7] * 1e-3 + 10.0
    x = x.to(DEV)
    from entrodrop_fast.ops.triton.moments import moments

    check_moments(ref_ops.moments(x), moments(x, block_t=16, block_d=16, splits=4), "offset")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bins", [1, 7, 80])
def test_bucket_counts_exact(shape, dtype, bins):
    from entrodrop_fast.ops.triton.bucket import bucket_counts

    x, f, m = make(shape, dtype), make(shape, dtype, seed=1), make_mask(shape)
    x[..., 0] = 1.5  # a constant channel: everything in bin 0
    assert torch.equal(bucket_counts(x, None, None, bins, **SMALL).long().cpu(), ref_counts(x, None, None, bins).cpu())
    assert torch.equal(bucket_counts(x, f, m, bins, **SMALL).long().cpu(), ref_counts(x, f, m, bins).cpu())


@pytest.mark.parametrize("paper_exact", [False, True])
def test_bucket_entropy(paper_exact, nan_empty):
    shape = (2, 41, 19)
    x, f, m = make(shape, torch.bfloat16), make(shape, torch.bfloat16, seed=2), make_mask(shape)
    x[0, 7, 3] = x[0, :, 3].max()  # ties at the max go to the last bin
    for args in [(x, None, None), (x, f, m)]:
        assert_close(ref_ops.bucket(*args, 20, paper_exact), tri().bucket(*args, 20, paper_exact), 1e-12, 1e-12, name="bucket")


def test_bucket_strided_and_edges(nan_empty):
    shape = (2, 29, 33)
    x = make(shape, torch.float16, strided=True)
    x[1, :, 4] = 0.0
    x[1, 3, 4] = 1.0  # one value at the max, the rest at the min
    mm = torch.ones(2, 2 * shape[1], dtype=torch.bool, device=DEV)[:, ::2]
    mm[1, 10:] = False
    assert_close(ref_ops.bucket(x, None, mm, 80, False), tri().bucket(x, None, mm, 80, False), 1e-12, 1e-12)
    from entrodrop_fast.ops.triton.bucket import bucket_counts

    assert torch.equal(bucket_counts(x, None, mm, 80, **SMALL).long().cpu(), ref_counts(x, None, mm, 80).cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False])
def test_cosine(dtype, fused, nan_empty):
    shape = (3, 21, 70)
    x, o, m = make(shape, dtype), make(shape, dtype, seed=4), make_mask(shape)
    for mask in (None, m):
        r, t = ref_ops.cosine(x, o, mask, fused), tri().cosine(x, o, mask, fused)
        assert_close(r[0], t[0], 1e-5, 1e-6, name="cos sum")
        assert_close(r[1], t[1], 0, name="count")
    xs = make(shape, dtype, strided=True)
    assert_close(ref_ops.cosine(xs, o, None, fused)[0], tri().cosine(xs, o, None, fused)[0], 1e-5, 1e-6, name="strided")


@pytest.mark.parametrize("n,d,k", [(2, 1, 1), (3, 5, 2), (37, 19, 5), (50, 12, 25)])
def test_knn_kth_distance(n, d, k, nan_empty):
    x = llm_like(n, d, seed=n, outliers=False).to(DEV)
    x[min(4, n - 1)] = x[0]  # a duplicate row: distance 0 to an *other* row counts
    assert_close(ref_ops.knn_kth_distance(x, k), tri().knn_kth_distance(x, k), 1e-5, 1e-6, name="knn")
    xt = x.t().contiguous().t()  # column-major
    assert_close(ref_ops.knn_kth_distance(xt, k), tri().knn_kth_distance(xt, k), 1e-5, 1e-6, name="knn strided")


def test_knn_half():
    x = llm_like(33, 16, seed=9, outliers=False, dtype=torch.bfloat16).to(DEV)
    assert_close(ref_ops.knn_kth_distance(x.float(), 3), tri().knn_kth_distance(x, 3), 1e-5, 1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="compile-only check for machines without a GPU")
def test_kernels_compile_for_gpu():
    """Every kernel compiles to sm_90 and sm_80 machine code here, without a GPU.

    In a fresh process without TRITON_INTERPRET (the interpreter patches triton.language).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-m", "entrodrop_fast.ops.triton._aot", "90", "80"], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode and ("ptxas" in r.stderr or "ImportError" in r.stderr):
        pytest.skip(f"cannot compile for a GPU here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sm_90: compiled" in r.stdout and "sm_80: compiled" in r.stdout, r.stdout
    for name in ("_bucket_fused_kernel", "_bucket_fused_kernel_wide", "_moments_partial_kernel", "_cosine_kernel"):
        assert name in r.stdout, name


# ------------------------------------------------------------------ fused bucket path, pairs


def _paths():
    return [dict(fused=True, block_t=8, block_d=32, num_warps=4), dict(fused=False, **SMALL)]


@pytest.mark.parametrize("shape", [(1, 2, 3), (3, 5, 7), (2, 37, 130)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bucket_fused_path(shape, dtype, nan_empty):
    """The fused kernel (packed register counters, H_d in the kernel) against the reference:
    1e-12 on H_d, which one count moved between bins would exceed by orders of magnitude."""
    from entrodrop_fast.ops.triton.bucket import bucket

    x, f, m = make(shape, dtype), make(shape, dtype, seed=1), make_mask(shape)
    x[..., 0] = 1.5  # a constant channel
    cfg = _paths()[0]
    for bins in (1, 5, 20, 32):
        for args in [(x, None, None), (x, f, m)]:
            assert_close(ref_ops.bucket(*args, bins, False), bucket(*args, bins, False, **cfg), 1e-12, 1e-12, name=f"bins={bins}")
    assert_close(ref_ops.bucket(x, f, None, 20, True), bucket(x, f, None, 20, True, **cfg), 1e-12, 1e-12, name="paper_exact")


def test_bucket_fused_strided_flush_and_ties(nan_empty):
    """Strided views, a mask with token stride 2, more than 255 tiles (the packed counters
    are unpacked mid-sample), ties at the max, a channel with one value at the max."""
    from entrodrop_fast.ops.triton.bucket import bucket

    shape = (2, 531, 9)  # 531 tokens in tiles of 2: 266 tiles, one unpack in between
    x = make(shape, torch.bfloat16, strided=True)
    x[0, 7, 3] = x[0, :, 3].max()
    x[1, :, 4] = 0.0
    x[1, 3, 4] = 1.0
    mm = torch.ones(2, 2 * shape[1], dtype=torch.bool, device=DEV)[:, ::2]
    mm[1, 400:] = False
    for mask in (None, mm):
        assert_close(ref_ops.bucket(x, None, mask, 20, False), bucket(x, None, mask, 20, False, fused=True, block_t=2, block_d=16, num_warps=1), 1e-12, 1e-12)


@pytest.mark.parametrize("cfg", _paths(), ids=["fused", "split"])
def test_bucket_wide_channels(cfg, nan_empty):
    """Channels whose fp32 range overflows (+-3e38) or is subnormal take the fp64 formula;
    the fused kernel leaves their channel blocks to its second launch. A NaN channel and a
    clean one share blocks with them."""
    from entrodrop_fast.ops.triton.bucket import bucket, bucket_pair

    x = llm_like(2, 29, 70, seed=4)
    x[0, :, 3] = torch.where(torch.arange(29) % 3 == 0, 3e38, -3e38 * torch.rand(29))
    x[1, :, 40] = torch.arange(29) * 1e-44  # subnormal range: bins / width overflows fp32
    x[1, 5, 41] = NAN
    x = x.to(DEV)
    h = bucket(x, None, None, 20, False, **cfg)
    want = ref_ops.bucket(x, None, None, 20)
    assert h.isnan().nonzero().tolist() == [[1, 41]]
    keep = ~h.isnan()
    assert_close(want[keep], h[keep], 1e-12, 1e-12)
    f = torch.zeros_like(x)
    hy, hx = bucket_pair(x, f, None, 20, False, **cfg)
    assert torch.equal(hy.isnan(), ~keep) and torch.equal(hx.isnan(), ~keep)
    assert_close(want[keep], hy[keep], 1e-12, 1e-12) and assert_close(want[keep], hx[keep], 1e-12, 1e-12)


@pytest.mark.parametrize("cfg", _paths(), ids=["fused", "split"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bucket_pair_is_the_two_single_calls(cfg, dtype, nan_empty):
    from entrodrop_fast.ops.triton.bucket import bucket, bucket_pair

    shape = (3, 23, 37)
    x, f, m = make(shape, dtype), make(shape, dtype, seed=5), make_mask(shape)
    for mask in (None, m):
        hy, hx = bucket_pair(x, f, mask, 13, False, **cfg)
        assert torch.equal(hy, bucket(x, f, mask, 13, False, **cfg))
        assert torch.equal(hx, bucket(x, None, mask, 13, False, **cfg))
        assert_close(ref_ops.bucket(x, None, mask, 13, False), hx, 1e-12, 1e-12, name="H(x)")
    hy, hx = tri().bucket_pair(x, f, m, 20, True)  # the backend's defaults
    assert torch.equal(hx, tri().bucket(x, None, m, 20, True)) and torch.equal(hy, tri().bucket(x, f, m, 20, True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_pair_is_the_two_single_calls(dtype, nan_empty):
    from entrodrop_fast.ops.triton.moments import moments, moments_pair

    shape = (2, 37, 45)
    x, f, m = make(shape, dtype, strided=True), make(shape, dtype, seed=6), make_mask(shape)
    for mask in (None, m):
        my, mx = moments_pair(x, f, mask, **SMALL)
        ry, rx = moments(x, f, mask, **SMALL), moments(x, None, mask, **SMALL)
        for k in ry:
            assert torch.equal(my[k], ry[k]) and torch.equal(mx[k], rx[k]), k
        check_moments(ref_ops.moments(x, None, mask), mx, "pair x")
    my, mx = tri().moments_pair(x, f, m)
    check_moments(ref_ops.moments(x, f, m), my, "backend pair y")


# ------------------------------------------------------------------ the kernels' NaN/Inf report

NAN, INF = float("nan"), float("inf")


def bad_data(dtype, case, shape=(3, 19, 21)):
    """x, f, mask with the bad values of ``case`` (token (1, 9) masked out)."""
    g = torch.Generator().manual_seed(3)
    B, T, D = shape
    x = torch.randn(shape, generator=g)
    f = 0.5 * torch.randn(shape, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 9] = False
    big = 3e38 if dtype != torch.float16 else 6e4
    if case == "nan_x":
        x[1, 5, 7] = NAN
    elif case == "inf_x":
        x[0, 0, 0] = INF
        x[2, T - 1, D - 1] = -INF
    elif case == "nan_f":
        f[1, 5, 7] = NAN
    elif case == "inf_f":
        f[2, 3, 4] = -INF
    elif case == "inf_both":  # Inf - Inf = NaN in Y only
        x[0, 4, 2] = INF
        f[0, 4, 2] = -INF
    elif case == "overflow":  # finite x and f; Y overflows fp32 (fp16: only fp16's range, no overflow)
        x[1, 3, 2] = big
        f[1, 3, 2] = big
    elif case == "masked":  # bad values only in the masked-out token
        x[1, 9, 3] = NAN
        f[1, 9, 4] = INF
        x[1, 9, 5] = big
        f[1, 9, 5] = big
    return x.to(dtype).to(DEV), f.to(dtype).to(DEV), mask.to(DEV)


BAD_CASES = ["clean", "nan_x", "inf_x", "nan_f", "inf_f", "inf_both", "overflow", "masked"]


def _bad_channels(y, mask):
    bad = ~torch.isfinite(y)
    if mask is not None:
        bad &= mask[..., None]
    return bad.any(1)  # (B, D)


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_report_exactly_the_bad_channels(dtype, case, nan_empty):
    from entrodrop_fast.ops.triton.bucket import bucket, bucket_pair
    from entrodrop_fast.ops.triton.cosine import cosine
    from entrodrop_fast.ops.triton.moments import moments, moments_pair

    x, f, mask = bad_data(dtype, case)
    for ff, m in ((None, None), (f, None), (f, mask)):
        y = x.float() if ff is None else x.float() + ff.float()
        bad = _bad_channels(y, m)
        clean = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
        for cfg in _paths():
            h = bucket(x, ff, m, 20, False, **cfg)
            assert torch.equal(h.isnan(), bad), f"bucket {cfg}: NaN at {h.isnan().nonzero().tolist()}, bad {bad.nonzero().tolist()}"
            assert_close(ref_ops.bucket(clean, None, m, 20)[~bad], h[~bad], 1e-12, 1e-12, name="bucket, clean channels")
            if ff is not None:
                hy, hx = bucket_pair(x, ff, m, 20, False, **cfg)
                assert torch.equal(hy.isnan(), bad) and torch.equal(hx.isnan(), _bad_channels(x.float(), m))
        mo = moments(x, ff, m, **SMALL)
        for k in ("mean", "m2", "min", "max"):
            assert torch.equal(mo[k].isnan(), bad), f"moments {k}"
        ref = ref_ops.moments(clean, None, m)
        assert_close(ref["count"], mo["count"], 0)
        assert_close(ref["m2"][~bad], mo["m2"][~bad], 1e-5, 1e-9, name="m2, clean channels")
        assert torch.equal(ref["min"][~bad], mo["min"][~bad]) and torch.equal(ref["max"][~bad], mo["max"][~bad])
        if ff is not None:
            my, mx = moments_pair(x, ff, m, **SMALL)
            assert torch.equal(my["m2"].isnan(), bad) and torch.equal(mx["max"].isnan(), _bad_channels(x.float(), m))
            s, n = cosine(x, ff, m, True)
            bad_t = bad.any(1) | _bad_channels(x.float(), m).any(1)
            assert torch.equal(s.isnan(), bad_t), "cosine"
            s, _ = cosine(x, ff, m, False)
            want = (_bad_channels(x.float(), m) | _bad_channels(ff.float(), m)).any(1)
            if case == "overflow":  # x = y = 3e38: x.y overflows fp32 in the kernel (NaN, as it always was)
                want[1] |= dtype != torch.float16
            assert torch.equal(s.isnan(), want), "cosine with y"


def test_fp16_sum_past_fp16_range_is_finite(nan_empty):
    """X = F = 60000 in fp16: Y = 120000 is past fp16's range but finite in fp32, where the
    kernels add: no report, and the values of the reference (which adds in fp32 too)."""
    from entrodrop_fast.ops.triton.bucket import bucket
    from entrodrop_fast.ops.triton.cosine import cosine
    from entrodrop_fast.ops.triton.moments import moments

    x, f, _ = bad_data(torch.float16, "clean")
    x[1, 3, 2] = f[1, 3, 2] = 60000.0
    assert float(x[1, 3, 2]) + float(f[1, 3, 2]) > torch.finfo(torch.float16).max
    for cfg in _paths():
        assert_close(ref_ops.bucket(x, f, None, 20), bucket(x, f, None, 20, **cfg), 1e-12, 1e-12)
    check_moments(ref_ops.moments(x, f), moments(x, f, **SMALL), "fp16 sum")
    assert_close(ref_ops.cosine(x, f, None, True)[0], cosine(x, f, None, True)[0], 1e-5, 1e-6)
    # the public calls: no error, no warning, the reference's values
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", module="numpy")
        h = ef.bucket_entropy(x, f, backend="triton")
        d = ef.delta_entropy(x, f, "gaussian_diag", backend="triton")
    assert_close(ref_ops.bucket(x, f, None, 20).sum(-1), h, 1e-12)
    assert_close(ef.delta_entropy(x, f, "gaussian_diag", backend="torch"), d, 1e-6, 1e-9)


@pytest.mark.parametrize("cfg", _paths(), ids=["fused", "split"])
def test_nan_inf_never_move_an_index_out_of_bounds(cfg):
    """All-bad channels straight to the kernels: every valid value is still counted in one
    of the channel's own bins (an index out of bounds would move counts to a neighbour)."""
    from entrodrop_fast.ops.triton.bucket import _split_counts, bucket

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 17, generator=g)
    x[0, ::3, ::2] = NAN
    x[0, 1::3, 1::2] = INF
    x[0, 2::3, 1::2] = -INF
    x[0, :, 16] = NAN  # a channel of NaN only
    x = x.to(DEV)
    h = bucket(x, None, None, 7, False, **cfg)
    assert bool(h[0].isnan().all()) and bool(torch.isfinite(h[1]).all())
    assert_close(ref_ops.bucket(x[1:], None, None, 7), h[1:], 1e-12, 1e-12)
    counts, _ = _split_counts(x, None, None, 7, **SMALL)
    assert bool((counts.sum(-1) == 30).all()), "a count landed outside its channel"


# ------------------------------------------------------------------ the public API with backend="triton"


CALLS = {
    "bucket": lambda x, f, **kw: ef.bucket_entropy(x, f, bins=9, **kw),
    "gaussian_diag": lambda x, f, **kw: ef.gaussian_diag_entropy(x, f, **kw),
    "delta_bucket": lambda x, f, **kw: ef.delta_entropy(x, f, "bucket", bins=9, **kw),
    "delta_gaussian_diag": lambda x, f, **kw: ef.delta_entropy(x, f, "gaussian_diag", **kw),
    "cosine": lambda x, f, **kw: ef.cosine_importance(x, f, **kw),
    "cosine_y": lambda x, f, **kw: ef.cosine_importance(x, y=f, **kw),
}


def _foreign_dirs() -> tuple[str, ...]:
    import os

    import numpy

    dirs = [os.path.dirname(numpy.__file__)]
    try:
        import triton

        dirs.append(os.path.dirname(triton.__file__))
    except ImportError:
        pass
    return tuple(dirs)


_FOREIGN = _foreign_dirs()


def _outcome(call, x, f, **kw):
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            res, err = CALLS[call](x, f, backend="triton", **kw), None
        except ValueError as e:
            res, err = None, str(e)
    # (numpy's and triton's own warnings inside the interpreter, e.g. "All-NaN slice", are not
    # the API's; the API's may point into the package, installed in site-packages)
    return res, err, [str(w.message) for w in rec if not w.filename.startswith(_FOREIGN)]


def _same(a, b, rtol):
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a.isnan(), b.isnan()) and bool(torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=rtol, atol=1e-9))


@pytest.mark.parametrize("policy", ["raise", "omit"])
@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_api_same_results_errors_and_warnings_as_the_explicit_check(call, case, policy, monkeypatch):
    """backend="triton" with the kernels' report (no pre-pass) = the same call with the
    API's explicit NaN/Inf check first: errors, warnings, results."""
    import entrodrop_fast.ops.triton_backend as tb

    x, f, mask = bad_data(torch.bfloat16 if case != "overflow" else torch.float32, case, shape=(3, 11, 10))
    assert "bucket" in tb.REPORTS_NONFINITE[x.device.type] and "bucket" in tb.PAIRS[x.device.type]
    for m in (None, mask):
        got = _outcome(call, x, f, mask=m, nan_policy=policy)
        monkeypatch.setattr(tb, "REPORTS_NONFINITE", {})
        want = _outcome(call, x, f, mask=m, nan_policy=policy)
        monkeypatch.undo()
        assert got[1] == want[1] and got[2] == want[2], (got[1:], want[1:])
        assert _same(got[0], want[0], 1e-9 if "gaussian" in call else 1e-12), (got[0], want[0])
        # bad among the valid tokens (fp16: 6e4 + 6e4 is finite in fp32; cosine_y adds nothing)
        hidden = case == "clean" or (case == "masked" and m is not None)
        y_bad = not hidden and not (case == "overflow" and call == "cosine_y")
        if hidden:
            assert got[1] is None and not got[2], got
        elif y_bad and policy == "raise":
            assert got[1] is not None and ("NaN or Inf" in got[1] or "overflowed float32" in got[1]), got
        elif y_bad:
            assert got[1] is None and any("skipped" in w for w in got[2]), got


def test_api_clean_input_reads_no_prepass(monkeypatch):
    calls = []
    real = api._nonfinite_tokens
    monkeypatch.setattr(api, "_nonfinite_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, f, mask = bad_data(torch.bfloat16, "clean", shape=(2, 11, 10))
    for call in CALLS:
        CALLS[call](x, f, backend="triton", mask=mask)
    assert calls == [], "the default call ran the separate NaN/Inf pass"
    x[1, 2, 3] = NAN
    with pytest.raises(ValueError, match="NaN or Inf in 1 token"):
        ef.bucket_entropy(x, f, backend="triton")
    assert calls == [1], "bad input takes the exact path once"


def test_api_omit_equals_masking_and_the_reference():
    x, f, mask = bad_data(torch.float16, "nan_f", shape=(3, 11, 10))
    keep = mask.clone()
    keep[1, 5] = False
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        h = ef.bucket_entropy(x, f, mask=mask, nan_policy="omit", backend="triton")
    assert torch.equal(h, ef.bucket_entropy(x, f, mask=keep, backend="triton"))
    assert_close(ref_ops.bucket(x, f, keep, 20).sum(-1), h, 1e-12, name="bucket")
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        d = ef.delta_entropy(x, f, "gaussian_diag", mask=mask, nan_policy="omit", backend="triton")
    # (H(x) keeps token (1, 5): its x is finite, only f held the NaN)
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        want = ef.delta_entropy(x, f, "gaussian_diag", mask=mask, nan_policy="omit", backend="torch")
    assert_close(want, d, 1e-6, 1e-9, name="delta gaussian_diag")
