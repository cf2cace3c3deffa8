"""The compiled CPU kernels (ops/cpp_backend.py) against the torch reference (ops/reference.py):
what only this backend has (long samples, the fused binning, the knn tiles and fallbacks, the
thread pool, the extension's argument errors). What every backend must do is in
test_backends.py, the conformance suite.

Both sides see the same fp32 values (fp16/bf16 are converted exactly), so the tolerances are
the same for every dtype: bucket counts must match bit for bit, min/max exactly. These tests
fail (never skip) when the extension is not built: CI builds it.
"""

import helpers as H
import pytest
import torch
from helpers import DTYPES, assert_close, llm_like

from entrodrop_fast import _ext
from entrodrop_fast.ops import cpp_backend as cpp
from entrodrop_fast.ops import reference as ref

CPP = H.Backend("cpp", "cpu")
_data = H.data


def check_moments(x, f=None, mask=None, name=""):
    H.check_moments(ref.moments(x, f, mask), cpp.moments(x, f, mask), CPP.tol, name)


def check_bucket(x, f=None, mask=None, bins=20, paper_exact=False, name=""):
    H.check_bucket(CPP, x, f, mask, bins, paper_exact, name)


def check_cosine(x, other, mask=None, fused=True, name=""):
    H.check_cosine(CPP, x, other, mask, fused, name)


def test_extension_is_built():
    ok, why = cpp.available()
    assert ok, why
    assert _ext.available()
    assert "cpu" in cpp.devices()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_2048x4096(dtype):
    x = llm_like(1, 2048, 4096, dtype=dtype, seed=3)
    f = llm_like(1, 2048, 4096, dtype=dtype, seed=4, outliers=False)
    check_moments(x, None, None, f"2048x4096 {dtype}")
    check_bucket(x, f, None, 80, False, f"2048x4096 {dtype}")
    check_cosine(x, f, None, True, f"2048x4096 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched(dtype):
    x, f, mask = _data((6, 300, 129), dtype, seed=5)
    check_moments(x, f, mask, "batched")
    check_bucket(x, f, mask, 80, False, "batched")
    check_cosine(x, f, mask, True, "batched")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bucket_long_samples(dtype):
    # samples over 2048 valid tokens take the two-sweep (streaming) path of the bucket kernel,
    # with prefetching; a ragged mask, f, 80 bins, a channel count that is not a multiple of
    # the 256-channel tile, and a channel-strided view (no prefetch)
    x, f, mask = _data((2, 3000, 300), dtype, seed=24)
    mask[1, 1500:] = False  # sample 1 has fewer than 2048 valid tokens, sample 0 more
    check_bucket(x, f, mask, 80, False, "long")
    check_bucket(x, None, None, 20, True, "long, paper")
    check_bucket(x, f, mask, 20, False, "long, 20 bins")  # the fused binning, blocks of 240 rows
    hy, hx = cpp.bucket_pair(x, f, mask, 32, False)
    assert_close(ref.bucket(x, f, mask, 32, False), hy, rtol=1e-12, atol=1e-12, name="long pair y")
    assert_close(
        ref.bucket(x, None, mask, 32, False), hx, rtol=1e-12, atol=1e-12, name="long pair x"
    )
    xt = x[:, :2600].transpose(1, 2).contiguous().transpose(1, 2)
    check_bucket(xt, None, None, 20, False, "long, channel stride 2600")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bucket_fused_binning_edges(dtype):
    """Up to 32 bins on AVX-512 the cached tile is binned and counted in one sweep, 16
    channels and blocks of 240 rows at a time: token counts around the block (240, 241, 480,
    481), channel counts that leave a partial group of 16 in the last tile (577 = 9 x 64 + 1,
    70), every bin count up to 32 and past it, the pair, a constant channel, a channel whose
    fp32 width is not finite (its tile takes the byte-plane path) and a subnormal range."""
    for T, D in ((240, 70), (241, 577), (480, 33), (481, 130)):
        x, f, mask = _data((2, T, D), dtype, seed=T)
        for bins in (1, 2, 7, 8, 16, 20, 31, 32, 33):
            check_bucket(x, None, None, bins, False, f"T={T} D={D} bins={bins}")
        check_bucket(x, f, mask, 20, True, f"T={T} D={D} f, mask, paper")
        hy, hx = cpp.bucket_pair(x, f, mask, 20, False)
        assert_close(ref.bucket(x, f, mask, 20, False), hy, rtol=1e-12, atol=1e-12, name="pair y")
        assert_close(
            ref.bucket(x, None, mask, 20, False), hx, rtol=1e-12, atol=1e-12, name="pair x"
        )
    x, _, _ = _data((1, 300, 40), torch.float32, seed=3)
    x[0, :, 1] = 2.5  # constant
    x[0, :, 17] = torch.linspace(-1, 1, 300) * 3e38  # width past fp32: binned in fp64
    x[0, :, 33] = torch.linspace(0, 1e-44, 300)  # subnormal range: scale not finite in fp32
    check_bucket(x, None, None, 20, False, "wide channels (fp32)")
    check_bucket(x[:, :, 34:], None, None, 20, False, "no wide channel (fp32)")


def test_llm_like_moments_have_no_cancellation():
    # Channels 1e4x larger than the rest, an offset of 3000, and a huge first ("sink") token.
    x = llm_like(2, 4000, 64, seed=11)
    x[:, 0, 5] = 2.0e5
    x[:, 0, 9] = -5.0e4
    check_moments(x, None, None, "llm-like")
    f = llm_like(2, 4000, 64, seed=12, outliers=False)
    check_moments(x, f, None, "llm-like fused")


def test_moments_offset_channels_across_segments():
    """Chunks merge in fp32 into segments of 128 rows before their fp64 fold: relative to a
    per-channel shift, so a channel far from zero (1e4 +- 1) keeps its M2. (A merge of
    absolute fp32 means lost 3e-5 of M2 here.) A ragged mask varies the chunk sizes, and
    T = 3001 leaves a partial last segment."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 3001, 40, generator=g) + 1e4
    x[:, :, 3] = torch.randn(2, 3001, generator=g) * 1e-3 - 2.5e3  # tiny spread, far away
    x[1, :, 7] += torch.linspace(0, 50, 3001)  # a drifting channel
    mask = torch.rand(2, 3001, generator=g) > 0.3
    f = torch.randn(2, 3001, 40, generator=g)
    for dt in (torch.float32, torch.bfloat16):
        check_moments(x.to(dt), None, None, f"offset {dt}")
        check_moments(x.to(dt), f.to(dt), mask, f"offset, f, mask {dt}")


def test_bucket_matches_onehot_paper_formulation():
    x = llm_like(1, 256, 96, seed=2)
    c = cpp.bucket(x, None, None, 80, True)[0].sum()
    # the paper's formulation sums fp32 probabilities: agreement to fp32 precision
    assert_close(ref.bucket_onehot_reference(x[0], 80), c, rtol=1e-6, name="onehot")


def test_knn_strided_and_large():
    x = llm_like(700, 96, seed=14)
    xt = x.t().contiguous().t()  # channel stride 700
    assert_close(
        ref.knn_kth_distance(x, 25), cpp.knn_kth_distance(xt, 25), rtol=1e-5, name="knn strided"
    )
    x = torch.randn(2048, 4096, generator=torch.Generator().manual_seed(15))
    out, rest = cpp._knn(x, 25)  # tiled (N > KNN_WHOLE_ROWS)
    assert rest == 0
    assert_close(ref.knn_kth_distance(x, 25), out, rtol=1e-5, name="knn 2048x4096")


def test_knn_memory_stays_under_a_tenth_of_nxn():
    # issue 3's budget, by the allocations torch sees (the tile, the candidate lists, the
    # small copies); the N x N matrix cdist + topk would build is 16.8 MB here
    from entrodrop_fast.ops.bench import make_input, peak_extra_bytes

    x = make_input((2048, 4096), torch.float32)[0]
    frac = peak_extra_bytes(lambda: cpp.knn_kth_distance(x, 25)) / (2048 * 2048 * 4)
    assert 0.02 < frac < 0.10, frac


@pytest.mark.parametrize("massive_only", [False, True])
def test_knn_llm_like_wide(massive_only):
    # D >> N with massive channels: the uncentred fp32 Gram trick errs ~1e-3 here (the
    # previous implementation's band bound did not hold); centred heavy channels fix it.
    x = llm_like(1024, 4096, seed=19)
    if massive_only:  # the benchmark's input: one channel ~3000 + 50 z, the rest N(0, 1)
        x = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(20))
        x[:, 1] = x[:, 1] * 50 + 3000.0
    assert_close(
        ref.knn_kth_distance(x, 25), cpp.knn_kth_distance(x, 25), rtol=1e-5, name="knn llm wide"
    )


def test_knn_tiles_and_fallback(monkeypatch):
    # the tiled path even for small N (by default N <= KNN_WHOLE_ROWS uses whole Gram rows;
    # the other tests cover that): N = 300 -> three 128-row tile blocks (the last one ragged);
    # k = 150 > the tile width, so rows cannot take their threshold from their diagonal tile
    monkeypatch.setattr(cpp, "KNN_WHOLE_ROWS", 0)
    x = llm_like(300, 40, seed=21)
    for k in (1, 7, 150, 299):
        out, rest = cpp._knn(x, k)
        assert rest == 0
        assert_close(ref.knn_kth_distance(x, k), out, rtol=1e-5, name=f"knn tiles k={k}")
    # 80 copies of one row among 200: their candidate lists overflow (80 ties at distance
    # ~0 > cap = 26 for k = 10) and those rows are answered from whole Gram rows.
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(22))
    x[100:180] = x[3]
    out, rest = cpp._knn(x, 10)
    assert rest >= 80
    assert (out[[3, *range(100, 180)]] == 0).all()
    assert_close(ref.knn_kth_distance(x, 10), out, rtol=1e-5, name="knn fallback")


def test_knn_tile_rejects_bad_tiles():
    C = _ext.require()
    g, sq = torch.zeros(16), torch.zeros(8)
    val, idx = torch.empty(8, 4), torch.empty(8, 4, dtype=torch.int32)
    cnt, thr = torch.zeros(8, dtype=torch.int32), torch.full((8,), float("inf"))
    ptrs = (val.data_ptr(), idx.data_ptr(), cnt.data_ptr(), thr.data_ptr())
    with pytest.raises(ValueError, match="must be diagonal"):  # overlaps the diagonal
        C.knn_tile_cpu(g.data_ptr(), 4, sq.data_ptr(), 8, 0, 4, 2, 4, 2, 0.0, *ptrs, 4, 1)
    with pytest.raises(ValueError, match="must lie in"):
        C.knn_tile_cpu(g.data_ptr(), 4, sq.data_ptr(), 8, 4, 4, 6, 4, 2, 0.0, *ptrs, 4, 1)
    with pytest.raises(ValueError, match="k < cap"):
        C.knn_tile_cpu(g.data_ptr(), 4, sq.data_ptr(), 8, 0, 4, 0, 4, 4, 0.0, *ptrs, 4, 1)


@pytest.mark.parametrize("mode", ["std", "omp", "pool"])
def test_other_thread_modes_give_the_same_results(tmp_path, mode):
    # the kernels borrow torch's OpenMP team by default (csrc/threads_cpu.cpp);
    # ENTRODROP_THREADS=std starts std::threads per call, =pool runs a pool of our own, =omp
    # requires the team: same numbers, in a fresh process
    x, f, mask = _data((2, 700, 300), torch.float32, seed=23)
    code = (
        "import sys, torch\n"
        "from entrodrop_fast import _ext\n"
        "from entrodrop_fast.ops import cpp_backend as cpp\n"
        "torch.set_num_threads(2)\n"
        "x, f, mask = torch.load(sys.argv[1])\n"
        "out = (cpp.moments(x, f, mask), cpp.bucket(x, f, mask, 20, False), "
        "cpp.knn_kth_distance(x[0], 5),\n"
        "       cpp.knn_radii(x[:, :400], f[:, :400], mask[:, :400], 5)[0])\n"
        "torch.save((_ext.require().thread_pool_cpu(), out), sys.argv[2])\n"
    )
    pool, (mom, buck, knn, fused) = H.run_child(
        code, (x, f, mask), tmp_path, ENTRODROP_THREADS=mode
    )
    if mode == "std":
        assert pool == "std::thread"
    elif mode == "pool":
        assert pool == "pool"
    elif "OpenMP" in torch.__config__.parallel_info():
        assert pool.startswith("openmp team of ") and "omp" in pool.rsplit("/", 1)[-1]
    else:  # no OpenMP runtime loaded: the pool
        assert pool == "pool"
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(buck, cpp.bucket(x, f, mask, 20, False))
        assert torch.equal(knn, cpp.knn_kth_distance(x[0], 5))
        assert torch.equal(
            fused.nan_to_num(-1.0),
            cpp.knn_radii(x[:, :400], f[:, :400], mask[:, :400], 5)[0].nan_to_num(-1.0),
        )
        here = cpp.moments(x, f, mask)
    finally:
        torch.set_num_threads(n)
    for key in mom:
        assert_close(mom[key], here[key], rtol=1e-12, atol=1e-12, name=key)


def test_unknown_thread_mode_is_reported_once(tmp_path):
    # a mistyped ENTRODROP_THREADS (here upper case) runs the default and says so, once
    x, f, mask = _data((1, 64, 32), torch.float32, seed=5)
    code = (
        "import sys, warnings, torch\n"
        "from entrodrop_fast import _ext\n"
        "from entrodrop_fast.ops import cpp_backend as cpp\n"
        "x, f, mask = torch.load(sys.argv[1])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = cpp.bucket(x, f, mask, 20, False)\n"
        "    b = cpp.bucket(x, f, mask, 20, False)\n"
        "msgs = [str(m.message) for m in w]\n"
        "torch.save((msgs, _ext.require().thread_pool_cpu(), a), sys.argv[2])\n"
    )
    msgs, pool, out = H.run_child(code, (x, f, mask), tmp_path, ENTRODROP_THREADS="POOL")
    assert len(msgs) == 1 and "ENTRODROP_THREADS='POOL'" in msgs[0] and "default" in msgs[0]
    assert pool != "std::thread"  # the default: torch's team, or the pool where none is loaded
    assert torch.equal(out, cpp.bucket(x, f, mask, 20, False))


def test_threads_do_not_change_results():
    x, f, mask = _data((2, 1000, 300), torch.float32, seed=18)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.moments(x, f, mask), cpp.bucket(x, f, mask, 20, False)
        torch.set_num_threads(2)
        two = cpp.moments(x, f, mask), cpp.bucket(x, f, mask, 20, False)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[1], two[1])
    for k in one[0]:
        assert_close(one[0][k], two[0][k], rtol=1e-12, atol=1e-12, name=k)


def test_kernel_errors_are_readable():
    C = _ext.require()
    x = torch.randn(1, 4, 3)
    out = torch.empty(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype must be 0"):
        C.bucket_cpu(
            x.data_ptr(), 0, 0, 7, [1, 4, 3], [12, 3, 1], [], [], 20, False, out.data_ptr(), 1
        )
    with pytest.raises(ValueError, match="shape must have 3 entries"):
        C.bucket_cpu(x.data_ptr(), 0, 0, 0, [4, 3], [3, 1], [], [], 20, False, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="k must be in"):
        cpp.knn_kth_distance(x[0], 4)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        cpp.bucket(x.double(), None, None, 20, False)


def test_bucket_kernel_stays_in_bounds_on_nan_and_inf_without_validation():
    """validate=False hands NaN/Inf straight to the kernel: the numbers are meaningless,
    but the process must not crash or write outside its histogram."""
    import entrodrop_fast as ef

    x = torch.randn(2, 64, 40)
    x[0, 3, 5] = float("nan")
    x[1, 7, 9] = float("inf")
    x[1, 8, 11] = float("-inf")
    h = ef.bucket_entropy(x, bins=20, backend="cpp", validate=False)
    assert h.shape == (2,)
