"""The tiled torch knn (ops/knn_tiled.py, the GPU path of knn_kth_distance), run on CPU:
radii within 1e-9 relative of exact fp64 distances on odd shapes, every dtype, strided
views, duplicated rows (the whole-row fallback), huge norms with tiny differences, tiny
values, and tiles small enough that every row meets several row and column blocks."""

import pytest
import torch
from helpers import DTYPES, assert_close, llm_like

from entrodrop_fast.ops import knn_tiled as kt
from entrodrop_fast.ops import reference as ref

RTOL = 1e-9


def exact_kth(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-th nearest other row from exact fp64 differences (no Gram trick), any size."""
    r = x.double()
    d = torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    return d.kthvalue(k, dim=1).values


def check(x, k, name, **blocks):
    got, n_rest = kt.knn_kth_distance_tiled(x, k, **blocks)
    assert got.dtype == torch.float64 and got.shape == (x.shape[0],)
    assert_close(exact_kth(x, k), got, RTOL, name=name)
    return n_rest


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N,D,k",
    [
        (2, 1, 1),
        (2, 3, 1),
        (26, 5, 25),
        (64, 4096, 25),
        (300, 1, 10),
        (257, 577, 25),
        (513, 33, 25),
        (1000, 7, 3),
    ],
    ids=str,
)
def test_matches_reference(dtype, N, D, k):
    x = llm_like(N, D, seed=N + D, dtype=dtype)
    check(x, k, f"{dtype} [{N}, {D}] k={k}")
    # the package's reference, which the API's torch backend runs, agrees too
    assert_close(ref.knn_kth_distance(x.float(), k), kt.knn_kth_distance(x, k), RTOL)


@pytest.mark.parametrize(
    "blocks",
    [
        {"row_block": 1, "col_block": 7},
        {"row_block": 64, "col_block": 50},
        {"row_block": 100, "col_block": 1000},
        {"row_block": 333, "col_block": 33},
    ],
    ids=str,
)
def test_small_tiles(blocks):
    # rows meet the diagonal in every position of a tile, tiles are ragged at the end
    x = llm_like(333, 40, seed=3, dtype=torch.bfloat16)
    check(x, 25, f"tiles {blocks}", **blocks)
    check(x, 1, f"tiles {blocks} k=1", **blocks)


def test_few_thousand_rows():
    x = llm_like(3000, 24, seed=4)
    check(x, 25, "[3000, 24]", row_block=700, col_block=1024)


def test_strided_views():
    base = llm_like(400, 130, seed=5, dtype=torch.float16)
    check(base[::2, ::3], 25, "rows and channels strided")
    check(base.t().contiguous().t(), 7, "column-major")
    check(base[50:350, 1:129], 25, "offset slice")
    expanded = llm_like(1, 17, seed=6).expand(30, 17) + torch.arange(30.0)[:, None] * 1e-3
    check(expanded, 4, "broadcast rows plus a ramp")


def test_duplicated_rows_take_the_fallback():
    # every row has 39 exact copies: the 21 candidates kept never reach past the tie band
    x = torch.randn(10, 12, generator=torch.Generator().manual_seed(7)).repeat(40, 1)
    n_rest = check(x, 5, "duplicates k=5", row_block=128, col_block=96)
    assert n_rest == x.shape[0]
    assert bool((kt.knn_kth_distance(x, 5) == 0).all())
    # k past the copies: the distance to the nearest other group
    check(x, 45, "duplicates k=45", row_block=128, col_block=96)
    # a few duplicated rows among distinct ones: only some rows take the fallback
    y = llm_like(200, 16, seed=8)
    y[100:140] = y[5]
    n_rest = check(y, 3, "some duplicates")
    assert 0 < n_rest < y.shape[0]


def test_huge_norms_tiny_differences():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(64, generator=g) * 1e37
    x = base + torch.randn(300, 64, generator=g) * 1e31  # differences a few ulps of fp32
    check(x, 25, "1e37 offset, 1e31 spread")
    y = (
        torch.full((300, 64), 3.0e38)
        - torch.randint(0, 1000, (300, 64), generator=g).float() * 2.0**104
    )
    check(y, 10, "near fp32 max")
    z = 1e4 + torch.randn(500, 300, generator=g) * 1e-3  # LLM-like shared offset, ulp-sized spread
    check(z, 25, "1e4 offset, 1e-3 spread")
    opp = torch.randn(200, 8, generator=g) * 3e38  # opposite signs near fp32 max
    check(opp.clamp(-3.4e38, 3.4e38), 5, "opposite huge values")


def test_tiny_values():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(300, 50, generator=g) * 1e-40  # subnormal fp32
    check(x, 25, "subnormal")
    y = torch.randn(300, 50, generator=g) * 1e-30
    y[:, 0] += 1.0  # one ordinary channel, all others tiny
    check(y, 7, "tiny spread next to an ordinary channel")


def test_massive_activation_channels():
    x = llm_like(800, 576, seed=11, dtype=torch.bfloat16)
    x[:, 5] = (torch.arange(800) % 3).to(torch.bfloat16) * 1e4
    check(x, 25, "massive channel")


def test_constant_rows_and_k_edges():
    x = torch.ones(40, 9)
    assert bool((kt.knn_kth_distance(x, 39) == 0).all())
    x = llm_like(40, 9, seed=12)
    check(x, 39, "k = N - 1")
    check(x, 1, "k = 1")


def test_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(
        ValueError, match=r"k must be an integer in \[1, N - 1\] = \[1, 9\], got 10"
    ):
        kt.knn_kth_distance(x, 10)
    with pytest.raises(ValueError, match="k must be"):
        kt.knn_kth_distance(x, 0)
    with pytest.raises(ValueError, match="k must be"):
        kt.knn_kth_distance(x, True)
    with pytest.raises(ValueError, match=r"x must be 2-D \[N, D\], got shape \(10,\)"):
        kt.knn_kth_distance(torch.randn(10), 1)
    with pytest.raises(TypeError, match="x must be float32"):
        kt.knn_kth_distance(torch.ones(10, 4, dtype=torch.int32), 1)


def test_nan_stays_in_bounds():
    # validate=False may hand NaN/Inf through: meaningless numbers, no error or bad index
    x = llm_like(200, 8, seed=13)
    x[3, 2] = float("nan")
    x[7, 1] = float("inf")
    out = kt.knn_kth_distance(x, 5)
    assert out.shape == (200,)


def test_gemm_precision_widens_the_band(monkeypatch):
    cuda = torch.device("cuda")  # only read, never allocated on
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kt._gemm_eps(cuda) == torch.finfo(torch.float32).eps
        torch.set_float32_matmul_precision("high")
        assert kt._gemm_eps(cuda) == 2.0**-10
        torch.set_float32_matmul_precision("medium")
        assert kt._gemm_eps(cuda) == 2.0**-8
        assert kt._gemm_eps(torch.device("cpu")) == torch.finfo(torch.float32).eps
    finally:
        torch.set_float32_matmul_precision(old)
    # a wider band (as with TF32 GEMMs) keeps the radii exact
    monkeypatch.setattr(kt, "_gemm_eps", lambda device: 2.0**-8)
    x = llm_like(400, 300, seed=14, dtype=torch.bfloat16)
    check(x, 25, "bf16-wide band")
