"""Triton kernels against the torch reference, under TRITON_INTERPRET=1 on CPU: what only
this backend has (kernel configurations: block sizes, splits, the fused and split bucket
paths, the AOT compile check). What every backend must do is in test_backends.py, the
conformance suite.

On a GPU machine run with TRITON_INTERPRET=0 to test the compiled kernels on CUDA
tensors instead (benches/gpu_check.sh does). Small odd shapes: the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import helpers as H  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import DTYPES, assert_close, llm_like  # noqa: E402

import entrodrop_fast as ef  # noqa: E402
from entrodrop_fast.ops import reference as ref_ops  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None,
        reason="triton is not installed (pip install triton)",
    ),
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
    return H.make(shape, dtype, DEV, seed, strided)


def make_mask(shape, seed=0):
    return H.make_mask(shape, DEV, seed)


ref_counts = H.ref_counts


def check_moments(ref, out, name=""):
    H.check_moments(ref, out, H.TOLS["triton"], name)


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
    x, f, m = (
        make(shape, torch.float32, strided=True),
        make(shape, torch.bfloat16, seed=3),
        make_mask(shape, 1),
    )
    assert x.stride(-1) != 1
    check_moments(ref_ops.moments(x), tri().moments(x, None, None), "strided")
    check_moments(
        ref_ops.moments(x, f.float(), m), tri().moments(x, f.float(), m[:, :]), "strided x+f masked"
    )
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
    assert torch.equal(
        bucket_counts(x, None, None, bins, **SMALL).long().cpu(),
        ref_counts(x, None, None, bins).cpu(),
    )
    assert torch.equal(
        bucket_counts(x, f, m, bins, **SMALL).long().cpu(), ref_counts(x, f, m, bins).cpu()
    )


def test_bucket_strided_and_edges(nan_empty):
    shape = (2, 29, 33)
    x = make(shape, torch.float16, strided=True)
    x[1, :, 4] = 0.0
    x[1, 3, 4] = 1.0  # one value at the max, the rest at the min
    mm = torch.ones(2, 2 * shape[1], dtype=torch.bool, device=DEV)[:, ::2]
    mm[1, 10:] = False
    assert_close(
        ref_ops.bucket(x, None, mm, 80, False), tri().bucket(x, None, mm, 80, False), 1e-12, 1e-12
    )
    from entrodrop_fast.ops.triton.bucket import bucket_counts

    assert torch.equal(
        bucket_counts(x, None, mm, 80, **SMALL).long().cpu(), ref_counts(x, None, mm, 80).cpu()
    )


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="compile-only check for machines without a GPU")
def test_kernels_compile_for_gpu():
    """Every kernel compiles to sm_90 and sm_80 machine code here, without a GPU.

    In a fresh process without TRITON_INTERPRET (the interpreter patches triton.language).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run(
        [sys.executable, "-m", "entrodrop_fast.ops.triton._aot", "90", "80"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode and ("ptxas" in r.stderr or "ImportError" in r.stderr):
        pytest.skip(f"cannot compile for a GPU here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sm_90: compiled" in r.stdout and "sm_80: compiled" in r.stdout, r.stdout
    for name in (
        "_bucket_fused_kernel",
        "_bucket_fused_kernel_wide",
        "_moments_partial_kernel",
        "_cosine_kernel",
    ):
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
            assert_close(
                ref_ops.bucket(*args, bins, False),
                bucket(*args, bins, False, **cfg),
                1e-12,
                1e-12,
                name=f"bins={bins}",
            )
    assert_close(
        ref_ops.bucket(x, f, None, 20, True),
        bucket(x, f, None, 20, True, **cfg),
        1e-12,
        1e-12,
        name="paper_exact",
    )


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
        assert_close(
            ref_ops.bucket(x, None, mask, 20, False),
            bucket(x, None, mask, 20, False, fused=True, block_t=2, block_d=16, num_warps=1),
            1e-12,
            1e-12,
        )


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
    assert_close(want[keep], hy[keep], 1e-12, 1e-12) and assert_close(
        want[keep], hx[keep], 1e-12, 1e-12
    )


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
    assert torch.equal(hx, tri().bucket(x, None, m, 20, True)) and torch.equal(
        hy, tri().bucket(x, f, m, 20, True)
    )


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "two-kernels"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bucket_cosine_equals_bucket_and_the_reference_cosine(fused, dtype, nan_empty):
    """bucket_cosine: H_d bit for bit bucket's, the cosine sums the reference's; partner x
    (Y = x + f) and partner c (Y = x), masks, a strided partner, and NaN in the partner only
    (the cosine's sum is NaN, H_d of Y is not)."""
    from entrodrop_fast.ops.triton.bucket import bucket, bucket_cosine

    shape = (3, 23, 70)
    x, o, m = make(shape, dtype), make(shape, dtype, seed=5), make_mask(shape)
    xs = make(shape, dtype, seed=6, strided=True)
    for mask in (None, m):
        for a, b, c in ((x, o, None), (o, None, x), (o, None, xs)):
            h, s, n = bucket_cosine(a, b, c, mask, 20, False, fused=fused)
            assert torch.equal(h, bucket(a, b, mask, 20, False, fused=fused))
            rs, rn = (
                ref_ops.cosine(a, b, mask, True) if c is None else ref_ops.cosine(c, a, mask, False)
            )
            assert torch.equal(n.cpu(), rn.cpu())
            assert_close(rs, s, 1e-5, 1e-5, name=f"cosine fused={fused}")
    bad = x.clone()
    bad[1, 4, 9] = NAN
    h, s, _ = bucket_cosine(o, None, bad, None, 20, False, fused=fused)
    assert not bool(h.isnan().any()) and s.isnan().tolist() == [False, True, False]


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

NAN, INF = H.NAN, H.INF
BAD_CASES = H.BAD_CASES
_bad_channels = H.bad_channels


def bad_data(dtype, case, shape=(3, 19, 21)):
    """x, f, mask with the bad values of ``case`` (token (1, 9) masked out)."""
    return H.bad_data(dtype, case, shape, DEV)


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_report_exactly_the_bad_channels(dtype, case, nan_empty):
    from entrodrop_fast.ops.triton.bucket import bucket, bucket_pair
    from entrodrop_fast.ops.triton.cosine import cosine
    from entrodrop_fast.ops.triton.moments import moments, moments_pair

    x, f, mask = bad_data(dtype, case)
    for ff, m in ((None, None), (f, None), (f, mask)):
        bad, clean = H.bad_and_clean(x, ff, m)
        for cfg in _paths():
            H.check_bad_bucket(bucket(x, ff, m, 20, False, **cfg), bad, clean, m, f"bucket {cfg}")
            if ff is not None:
                hy, hx = bucket_pair(x, ff, m, 20, False, **cfg)
                assert torch.equal(hy.isnan(), bad) and torch.equal(
                    hx.isnan(), _bad_channels(x.float(), m)
                )
        mo = moments(x, ff, m, **SMALL)
        for k in ("mean", "m2", "min", "max"):
            assert torch.equal(mo[k].isnan(), bad), f"moments {k}"
        ref = ref_ops.moments(clean, None, m)
        assert_close(ref["count"], mo["count"], 0)
        assert_close(ref["m2"][~bad], mo["m2"][~bad], 1e-5, 1e-9, name="m2, clean channels")
        assert torch.equal(ref["min"][~bad], mo["min"][~bad]) and torch.equal(
            ref["max"][~bad], mo["max"][~bad]
        )
        if ff is not None:
            my, mx = moments_pair(x, ff, m, **SMALL)
            assert torch.equal(my["m2"].isnan(), bad) and torch.equal(
                mx["max"].isnan(), _bad_channels(x.float(), m)
            )
            s, n = cosine(x, ff, m, True)
            bad_t = bad.any(1) | _bad_channels(x.float(), m).any(1)
            assert torch.equal(s.isnan(), bad_t), "cosine"
            s, _ = cosine(x, ff, m, False)
            want = (_bad_channels(x.float(), m) | _bad_channels(ff.float(), m)).any(1)
            if (
                case == "overflow"
            ):  # x = y = 3e38: x.y overflows fp32 in the kernel (NaN, as it always was)
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
