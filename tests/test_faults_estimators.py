"""Faults of the estimators (issue 11): extreme finite values, unusual strides, bad options.

Every fast path must agree with the reference (bucket: bit-identical counts) on inputs at
the edges of fp32 -- subnormal ranges, ranges whose max - min overflows, Y = X + F past
fp32's range, knn rows whose squared norms leave fp32 -- and every bad option must raise
a clear error instead of returning nan / -inf or crashing.
"""

import importlib.util
import math
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import ESTIMATOR_KW as KW
from helpers import assert_close

import entrodrop_fast as ef
from entrodrop_fast.ops import cpp_backend as cpp
from entrodrop_fast.ops import reference as R

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TRITON_DEV = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or TRITON_DEV is None, reason="triton missing, or no GPU and TRITON_INTERPRET=0"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
F32_MAX = torch.finfo(torch.float32).max


def extreme_channels(n: int = 64) -> torch.Tensor:
    """[1, n, 6] fp32, one channel per kind of extreme range (n a multiple of 4):
    0: k * 2^-149 (a subnormal range); 1: (k - (n-1)/2) * 2^123 (max - min = 6.7e38 overflows
    fp32); 2: +-3e38 alternating (overflows too, two values); 3: evenly spaced in +-1e-37
    (a normal range below bins * 2^-128: bins / width overflows); 4: ordinary; 5: constant."""
    k = torch.arange(n, dtype=torch.float64)
    x = torch.empty(1, n, 6, dtype=torch.float64)
    x[0, :, 0] = k * 2.0**-149
    x[0, :, 1] = (k - (n - 1) / 2) * 2.0**123
    x[0, :, 2] = torch.where(k % 2 == 0, 3e38, -3e38)
    x[0, :, 3] = (k - (n - 1) / 2) * (2e-37 / (n - 1))
    x[0, :, 4] = torch.sin(k)
    x[0, :, 5] = 7.0
    x = x.float()
    assert bool(torch.isfinite(x).all())
    return x


def ref_counts(y: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin counts int64 [D, bins] of one sample y [N, D] by the reference's bin index."""
    idx = R.bucket_bin_index(y, bins)
    counts = torch.zeros(y.shape[1], bins, dtype=torch.int64)
    return counts.scatter_add_(1, idx.t(), torch.ones_like(idx.t()))


# ------------------------------------------------------------------ bucket: extreme ranges


@pytest.mark.parametrize("bins", [64, 16, 5, 1])
def test_bucket_extreme_ranges_closed_form(bins):
    # channels 0, 1 and 3 are n evenly spaced values: value k goes to bin
    # min(floor(k * bins / (n - 1)), bins - 1) (no k on a bin edge for these bins), whatever
    # the scale; the old fp32 formula put all of them in bin 0 (or NaN-dependent bins)
    n = 64
    x = extreme_channels(n)
    exact = torch.tensor([min(k * bins // (n - 1), bins - 1) for k in range(n)]).bincount(
        minlength=bins
    )
    counts = ref_counts(x[0], bins)
    for d in (0, 1, 3):
        assert torch.equal(counts[d], exact), (
            f"channel {d}: {counts[d].tolist()} != {exact.tolist()}"
        )
    p = exact.double() / n
    h_even = float(-(p[p > 0] * p[p > 0].log()).sum())
    h = R.bucket(x, bins=bins)[0]
    for d in (0, 1, 3):
        assert h[d].item() == pytest.approx(h_even, abs=1e-12)
    assert h[2].item() == pytest.approx(
        math.log(2) if bins > 1 else 0.0, abs=1e-12
    )  # +-3e38: two values
    assert h[5].item() == 0.0


@pytest.mark.parametrize("bins", [64, 20, 7, 1])
@pytest.mark.parametrize(
    "T", [64, 2100], ids=["cached", "streamed"]
)  # > 2048 tokens: the two-sweep path
def test_bucket_extreme_ranges_cpp_equals_reference(bins, T):
    x = extreme_channels(64).repeat(1, T // 64 + 1, 1)[:, :T]
    x = torch.cat([x, torch.randn(1, T, 70)], 2)  # wide channels share a tile with ordinary ones
    assert_close(
        R.bucket(x, bins=bins), cpp.bucket(x, bins=bins), 1e-12, 1e-12, name=f"bins={bins}"
    )
    assert_close(
        ef.bucket_entropy(x, bins=bins, backend="torch"),
        ef.bucket_entropy(x, bins=bins, backend="cpp"),
        1e-12,
    )


def test_bucket_extreme_ranges_bf16_and_fused_f():
    x = extreme_channels(64)
    xb = x.to(torch.bfloat16)  # bf16 reaches 3e38 and subnormals too
    assert_close(R.bucket(xb, bins=20), cpp.bucket(xb, bins=20), 1e-12, 1e-12, name="bf16")
    # Y = 0 + F with F's range subnormal, and Y's range past 3.4e38 from finite halves
    f = x.clone()
    zero = torch.zeros_like(x)
    half = x / 2
    for xx, ff in ((zero, f), (half, half)):
        r = R.bucket(xx, ff, None, 20)
        assert_close(r, cpp.bucket(xx, ff, None, 20), 1e-12, 1e-12, name="x + f")
        assert_close(r, R.bucket(xx + ff, None, None, 20), 0, name="fused = materialised")


def test_bucket_extreme_ranges_with_mask():
    x = extreme_channels(64)
    mask = torch.ones(1, 64, dtype=torch.bool)
    mask[0, 5::7] = False
    r = R.bucket(x, None, mask, 20)
    assert_close(r, R.bucket(x[:, mask[0]], None, None, 20), 0, name="mask = dropping")
    assert_close(r, cpp.bucket(x, None, mask, 20), 1e-12, 1e-12, name="cpp mask")


@needs_triton
@pytest.mark.triton
@pytest.mark.filterwarnings(
    "ignore::RuntimeWarning"
)  # the interpreter's numpy on wide channels' fp32 path
def test_bucket_extreme_ranges_triton_counts_bit_identical():
    from entrodrop_fast.ops.triton.bucket import bucket_counts

    x = extreme_channels(64).to(TRITON_DEV)
    for bins in (64, 20, 1):
        got = bucket_counts(x, None, None, bins, block_t=16, block_d=32, splits=3)[0].cpu().long()
        assert torch.equal(got, ref_counts(x[0].cpu(), bins)), f"bins={bins}"
    f = (x / 2).contiguous()
    got = bucket_counts(f, f, None, 20, block_t=16, block_d=32, splits=2)[0].cpu().long()
    assert torch.equal(got, ref_counts((f + f)[0].cpu(), 20)), "x + f"


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("T", [64, 2100], ids=["fused", "two-pass"])
@pytest.mark.parametrize("bins", [20, 4096], ids=["shared", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bucket_extreme_ranges_cuda_counts_bit_identical(T, bins, dtype):
    if not cpp.available()[0] or "cuda" not in cpp.devices():
        pytest.skip("the extension has no CUDA kernels")
    from entrodrop_fast.ops import cuda_backend

    x = extreme_channels(64).repeat(1, T // 64 + 1, 1)[:, :T]
    x = torch.cat([x, torch.randn(1, T, 58)], 2).to(dtype)  # D = 64: the 16-byte path
    xc = x.cuda()
    got = cuda_backend.bucket_counts(xc, None, None, bins)[0].cpu().long()
    assert torch.equal(got, ref_counts(x[0].float(), bins))
    half = (xc.float() / 2).to(dtype)
    got = cuda_backend.bucket_counts(half, half, None, bins)[0].cpu().long()
    assert torch.equal(got, ref_counts((half.float() + half.float())[0].cpu(), bins)), "x + f"


# ------------------------------------------------------------------ Y = X + F overflow


def overflow_pair(dtype=torch.float32):
    """x, f [2, 12, 4], finite, where Y = x + f overflows fp32 in token (1, 3) only."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 4, generator=g)
    f = torch.randn(2, 12, 4, generator=g)
    x[1, 3, 2] = 3e38
    f[1, 3, 2] = 3e38
    x[0, 5, 1] = 3e38  # large but cancelling: 3e38 - 3e38 = 0, fine
    f[0, 5, 1] = -3e38
    return x.to(dtype), f.to(dtype)


@pytest.mark.parametrize("method", ef.METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_y_overflow_raises(method, dtype):
    x, f = overflow_pair(dtype)
    assert bool(torch.isfinite(x).all() and torch.isfinite(f).all())
    with pytest.raises(
        ValueError,
        match=r"Y = X \+ F overflowed float32 in 1 token.*bfloat16|Y = X \+ F overflowed float32 "
        r"in 1 token.*float32",
    ) as e:
        ef.entropy(x, method, f, **KW[method])
    assert str(dtype) in str(e.value) and "nan_policy='omit'" in str(e.value)
    with pytest.raises(ValueError, match=r"Y = X \+ F overflowed"):
        ef.delta_entropy(x, f, method, **KW[method])


@pytest.mark.parametrize("method", ef.METHODS)
def test_y_overflow_omitted_like_nan(method):
    x, f = overflow_pair()
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 3] = False
    with pytest.warns(RuntimeWarning, match=r"skipped 1 token.*Y = X \+ F overflowed float32"):
        h = ef.entropy(x, method, f, nan_policy="omit", **KW[method])
    expect = ef.entropy(x, method, f, mask=keep, **KW[method])
    assert_close(expect, h, 0, name=method)
    xn = x.clone()
    xn[1, 3, 0] = float("nan")  # the same token holding NaN in x: the same result
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        assert_close(ef.entropy(xn, method, f, nan_policy="omit", **KW[method]), h, 0, name=method)


def test_y_overflow_cosine_and_mask():
    x, f = overflow_pair()
    with pytest.raises(ValueError, match=r"Y = X \+ F overflowed"):
        ef.cosine_importance(x, f)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 3] = False
    h = ef.bucket_entropy(x, f, mask=keep)  # the overflowing token is masked out: no error
    assert_close(R.bucket(x, f, keep, 20).sum(-1), h, 1e-12)
    # y given on its own is not added: large values are fine there (and |x|^2 past fp32's
    # range is computed in fp64)
    y = x.clone()
    y[1, 3, 2] = 3e38
    for backend in ("cpp", "torch"):
        s = ef.cosine_importance(x, y=y, backend=backend)
        rs, rn = R.cosine(x, y, None, fused=False)
        assert_close(1 - rs / rn, s, 1e-12, name=backend)
    # fp16 cannot overflow fp32 (|x| + |f| <= 131008): nothing to check, nothing raised
    xh = (6e4 - 1e3 * torch.rand(1, 6, 3)).to(torch.float16)
    assert_close(R.moments(xh, xh)["m2"], cpp.moments(xh, xh)["m2"], 1e-5, name="fp16 x + f")
    assert math.isfinite(ef.gaussian_diag_entropy(xh, xh).item())


def test_y_overflow_message_says_what_to_do():
    x, f = overflow_pair(torch.bfloat16)
    with pytest.raises(ValueError) as e:
        ef.bucket_entropy(x, f)
    msg = str(e.value)
    for part in (
        "Y = X + F overflowed float32",
        "1 token",
        "torch.bfloat16",
        "float64 input is read as float32",
        "power of two",
        "nan_policy='omit'",
    ):
        assert part in msg, f"{part!r} missing from: {msg}"


def test_finite_large_tokens_are_not_flagged():
    # |x| up to fp32's max everywhere (the 2-norm scan overflows to inf): re-checked exactly
    x = torch.full((8, 5), F32_MAX)
    x[:, 0] = torch.arange(8.0)
    x[::2, 1] = -F32_MAX
    h = ef.bucket_entropy(x)
    assert_close(R.bucket(x[None], bins=20).sum(), h, 1e-12)
    with pytest.raises(ValueError, match="NaN or Inf in 1 token"):
        x[3, 4] = float("inf")
        ef.bucket_entropy(x)


# ------------------------------------------------------------------ knn: rows past fp32's range


@pytest.mark.parametrize("scale", [1e19, 1e30, 7e37, 1e-25, 1e-41], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("n", [60, 600], ids=["whole-rows", "tiled"])
def test_knn_extreme_scales_equal_reference(scale, n):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(n, 8, generator=g).double() * scale).float()
    assert bool(torch.isfinite(x).all()) and bool((x != 0).any())
    r = R.knn_kth_distance(x, 3)
    c, _ = cpp._knn(x, 3)
    # 1e-41 is subnormal (a few bits per value): both sides see the same fp32 values
    assert_close(r, c, 1e-12, name=f"knn radii at {scale:g}")
    assert_close(
        ef.knn_entropy(x, k=3, backend="torch"), ef.knn_entropy(x, k=3, backend="cpp"), 1e-12
    )


def test_knn_heavy_channel_spanning_fp32():
    # a massive channel at +-3e38 (centring it overflows fp32) over ordinary channels: the
    # nearest neighbours are the rows of the same sign, ~1 apart; exact distances as truth
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 8, generator=g)
    x[:, 1] = torch.where(torch.rand(600, generator=g) > 0.5, 3e38, -3e38)
    d = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    truth = d.kthvalue(5, dim=1).values
    assert float(truth.max()) < 10  # the huge channel does not reach the 5th neighbour
    assert_close(truth, cpp.knn_kth_distance(x, 5), 1e-12, name="cpp")
    assert_close(truth, R.knn_kth_distance(x, 5), 1e-12, name="reference")


@needs_triton
@pytest.mark.triton
@pytest.mark.parametrize("scale", [1.0, 1e19, 7e37, 1e-25, 1e-41], ids=lambda s: f"{s:g}")
def test_knn_extreme_scales_triton(scale):
    from entrodrop_fast.ops.triton.knn import knn_kth_distance

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(40, 6, generator=g).double() * scale).float()
    got = knn_kth_distance(x.to(TRITON_DEV), 3).cpu()
    assert_close(
        R.knn_kth_distance(x, 3), got, 1e-5, name=f"triton knn at {scale:g}"
    )  # fp32 kernel


# ------------------------------------------------------------------ strides


def test_negative_stride_numpy_equals_copy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 6)).astype(np.float32)
    b = rng.standard_normal((40, 6)).astype(np.float32)
    for view in (np.flip(a, 0), np.flip(a, 1), a[::-2, ::-1]):
        assert any(s < 0 for s in view.strides)
        copy = np.ascontiguousarray(view)
        for m in ef.METHODS:
            got = ef.entropy(view, m, **KW[m])
            assert isinstance(got, np.ndarray)
            assert got == ef.entropy(copy, m, **KW[m]), m
    fb = np.flip(b, 0)
    assert ef.bucket_entropy(a, fb) == ef.bucket_entropy(a, np.ascontiguousarray(fb))
    assert ef.cosine_importance(a, y=fb) == ef.cosine_importance(a, y=np.ascontiguousarray(fb))
    mask = np.ones(40, dtype=bool)
    mask[::3] = False
    assert ef.gaussian_diag_entropy(a, mask=np.flip(mask)) == ef.gaussian_diag_entropy(
        a, mask=np.ascontiguousarray(np.flip(mask))
    )


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_stride0_views_equal_materialised(backend):
    g = torch.Generator().manual_seed(4)
    views = {
        "samples": torch.randn(1, 30, 6, generator=g).expand(3, 30, 6),  # stride 0 on B
        "channels": torch.randn(2, 30, 1, generator=g).expand(2, 30, 6),  # stride 0 on D
        "tokens": torch.randn(2, 1, 6, generator=g).expand(
            2, 30, 6
        ),  # stride 0 on T: all rows alike
        "rows": torch.randn(1, 6, generator=g).expand(30, 6),  # [N, D], row stride 0
    }
    for name, v in views.items():
        assert 0 in v.stride()
        m = v.contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # floored / singular on degenerate data
            for meth in ef.METHODS:
                got = ef.entropy(v, meth, backend=backend, **KW[meth])
                assert_close(
                    ef.entropy(m, meth, backend=backend, **KW[meth]),
                    got,
                    1e-12,
                    name=f"{name} {meth}",
                )
            assert_close(
                ef.delta_entropy(m, m, "bucket", backend=backend),
                ef.delta_entropy(v, v, "bucket", backend=backend),
                1e-12,
            )
        f = torch.randn(m.shape, generator=g)
        assert_close(
            ef.cosine_importance(m, f, backend=backend),
            ef.cosine_importance(v, f, backend=backend),
            1e-12,
            name=f"{name} cosine",
        )


def test_stride0_knn_kernel_path():
    # a row stride of 0 reaching the knn kernel used to fail ("need ... ld >= D")
    x = torch.randn(1, 8).expand(40, 8)
    assert torch.equal(cpp.knn_kth_distance(x, 3), torch.zeros(40, dtype=torch.float64))
    y = torch.randn(40, 1).expand(40, 8)
    assert_close(R.knn_kth_distance(y.contiguous(), 3), cpp.knn_kth_distance(y, 3), 1e-12)


def test_numpy_broadcast_view():
    a = np.random.default_rng(1).standard_normal((1, 5)).astype(np.float32)
    b = np.broadcast_to(a, (30, 5))  # read-only, row stride 0
    assert ef.bucket_entropy(b) == 0.0
    c = np.broadcast_to(np.arange(30, dtype=np.float32)[:, None], (30, 5))  # channel stride 0
    counts = np.bincount([min(k * 20 // 29, 19) for k in range(30)], minlength=20) / 30
    assert ef.bucket_entropy(c) == pytest.approx(-5 * (counts * np.log(counts)).sum(), abs=1e-12)


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "bins", [np.int64(20), np.int32(20), torch.tensor(20), torch.tensor(20, dtype=torch.int16)]
)
def test_bins_any_integral(bins):
    x = torch.randn(50, 3)
    assert ef.bucket_entropy(x, bins=bins).item() == ef.bucket_entropy(x, bins=20).item()
    assert ef.knn_entropy(x, k=np.int64(3)).item() == ef.knn_entropy(x, k=3).item()


@pytest.mark.parametrize(
    "bins",
    [
        20.5,
        20.0,
        np.float64(20),
        torch.tensor(20.0),
        True,
        np.True_,
        torch.tensor(True),
        "20",
        None,
    ],
)
def test_bins_not_integral_refused(bins):
    with pytest.raises(TypeError, match="bins must be an integer"):
        ef.bucket_entropy(torch.randn(50, 3), bins=bins)


@pytest.mark.parametrize("bins", [0, -3, 2**16 + 1, 10**9, 2**31, 2**64])
def test_bins_out_of_range(bins):
    with pytest.raises(ValueError, match=r"bins must be in \[1, 65536\].*counters per channel"):
        ef.bucket_entropy(torch.randn(50, 3), bins=bins)


def test_bins_maximum_works_on_every_cpu_backend():
    n = 50
    x = torch.linspace(0, 1, n)[:, None].repeat(1, 3)  # evenly spaced: every value its own bin
    for backend in ("cpp", "torch"):
        assert ef.bucket_entropy(x, bins=2**16, backend=backend).item() == pytest.approx(
            3 * math.log(n), abs=1e-12
        )
    with pytest.raises(ValueError, match=r"bins must be in \[1, 65536\]"):
        cpp.bucket(x[None], None, None, 2**16 + 1)  # the kernel checks too (no std::bad_alloc)


@pytest.mark.parametrize("k", [3.0, True, "3"])
def test_k_not_integral_refused(k):
    with pytest.raises(TypeError, match="k must be an integer"):
        ef.knn_entropy(torch.randn(20, 3), k=k)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -1.0, 0.0, 1.0, 1])
def test_renyi_alpha_refused(alpha):
    with pytest.raises(ValueError, match="alpha must"):
        ef.renyi_entropy(torch.randn(20, 3), alpha=alpha)


def test_renyi_alpha_accepts_real_numbers():
    x = torch.randn(20, 3)
    h = ef.renyi_entropy(x, alpha=4.0).item()
    for a in (np.float64(4), np.float32(4), 4, torch.tensor(4.0)):
        assert ef.renyi_entropy(x, alpha=a).item() == h
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ef.renyi_entropy(x, alpha="4")


@pytest.mark.parametrize("value", [-1e-12, float("nan"), float("inf"), -1.0])
def test_var_floor_and_ridge_refused(value):
    x = torch.randn(20, 3)
    with pytest.raises(ValueError, match="var_floor must be a finite number >= 0"):
        ef.gaussian_diag_entropy(x, var_floor=value)
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        ef.gaussian_full_entropy(x, ridge=value)
    with pytest.raises(TypeError, match="ridge must be a real number"):
        ef.gaussian_full_entropy(x, ridge="1e-6")


def test_streaming_states_refuse_bad_floor_and_ridge():
    x = torch.randn(20, 3)
    ms, cs = ef.MomentState(3).update(x), ef.CovState(3).update(x)
    assert math.isfinite(ms.result()["gaussian_diag_entropy"].item())
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="var_floor must be a finite number >= 0"):
            ms.result(var_floor=bad)
        with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
            cs.result(ridge=bad)


def test_var_floor_zero_and_ridge_none():
    x = torch.randn(20, 3)
    x[:, 1] = 2.0
    assert ef.gaussian_diag_entropy(x, var_floor=0.0).item() == float(
        "-inf"
    )  # no floor: a dead channel is -inf
    with pytest.warns(RuntimeWarning, match="singular"):
        assert math.isfinite(ef.gaussian_full_entropy(x, ridge=None).item())


def test_cosine_errors_name_the_argument_used():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"^y must have the shape of x"):
        ef.cosine_importance(x, y=torch.randn(2, 10, 5))
    with pytest.raises(ValueError, match=r"^y must have the dtype of x"):
        ef.cosine_importance(x, y=torch.randn(2, 10, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"^y must be float32"):
        ef.cosine_importance(x, y=torch.ones(2, 10, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^f must have the shape of x"):
        ef.cosine_importance(x, torch.randn(2, 10, 5))
    with pytest.raises(ValueError, match=r"^y must have the shape of x"):
        ef.angular_distance(x, torch.randn(2, 10, 5))
