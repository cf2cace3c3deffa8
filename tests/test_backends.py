"""Every backend against the torch reference: one suite, the same shapes, strides, masks,
dtypes and edge cases for each (docs/CONTRACT.md), run through the implementations that
ops/backends.py's table routes each op to (torch, cpp, triton under TRITON_INTERPRET=1 on
CPU or on a GPU, cuda on a GPU). Backend-specific internals (kernel variants, tiles, thread
pools) stay in test_cpp_backend.py, test_triton_backend.py and test_cuda_backend.py.
"""

import inspect
import math
import warnings

import pytest
import torch
from helpers import (
    BAD_CASES,
    DTYPES,
    Backend,
    assert_close,
    backend_params,
    bad_and_clean,
    bad_channels,
    bad_data,
    check_bad_bucket,
    check_bucket,
    check_bucket_cosine,
    check_cosine,
    check_moments,
    data,
    llm_like,
    make,
    make_mask,
    ref_counts,
    require,
    strided_views,
)

import entrodrop_fast as ef
from entrodrop_fast import _ext
from entrodrop_fast.ops import api
from entrodrop_fast.ops import backends as B
from entrodrop_fast.ops import reference as ref_ops

# [B, T, D]: one token, a single channel, odd sizes, several samples, an LLM-sized row
SHAPES = [
    (1, 1, 2),
    (1, 2, 1),
    (1, 3, 5),
    (3, 17, 9),
    (1, 33, 65),
    (3, 33, 65),
    (3, 37, 70),
    (1, 257, 577),
    (2, 100, 4096),
]
INTERPRETER_MAX = 2500  # elements per input under Triton's interpreter (slow)
# Most elements per input by backend: the interpreter is slow, the torch backend is the
# reference itself (plumbing only), CPU time is shared; the GPUs take every shape.
MAX_ELEMENTS = {"torch": INTERPRETER_MAX, "cpp": 150_000, "triton": 150_000, "cuda": None}


@pytest.fixture(params=backend_params())
def be(request) -> Backend:
    return require(request.param)


def small_enough(be: Backend, shape) -> None:
    limit = INTERPRETER_MAX if be.interpreted else MAX_ELEMENTS[be.name]
    if be.dev == "cuda":
        limit = None
    if limit is not None and math.prod(shape) > limit:
        pytest.skip(f"{math.prod(shape)} elements: too many for {be.name} on {be.dev} here")


# ------------------------------------------------------------------ the table itself


def test_table_covers_every_backend_device_and_op():
    for name in B.BACKENDS:
        mod = B._import(name)
        assert mod is not None, name
        for attr in ("available", "devices", "PAIRS", "REPORTS_NONFINITE"):
            assert hasattr(mod, attr), f"{name} lacks {attr} (BackendModule)"
        rows = [dev for (b, dev) in B.TABLE if b == name]
        assert rows, name
        for dev in rows:
            ops = B.TABLE[(name, dev)]
            assert set(ops) <= set(B.OPS), (name, dev)
            assert set(B.OPS) - set(ops) <= B.OPTIONAL_OPS, (
                f"{name} on {dev} lacks {set(B.OPS) - set(ops)}"
            )
            for op, impl in ops.items():
                if impl == B.NATIVE:
                    assert callable(getattr(mod, op, None)), (
                        f"{name}.{op} is native on {dev} but missing"
                    )
                else:
                    assert impl and all(t in B.BACKENDS or t == "knn_tiled" for t in impl), (
                        name,
                        dev,
                        op,
                        impl,
                    )
            # the declarations name native ops only
            assert set(mod.PAIRS.get(dev, ())) <= {op for op, i in ops.items() if i == B.NATIVE}, (
                name,
                dev,
            )
            assert set(mod.REPORTS_NONFINITE.get(dev, ())) <= {
                op for op, i in ops.items() if i == B.NATIVE
            }, (name, dev)
            for op in mod.PAIRS.get(dev, ()):
                assert callable(getattr(mod, f"{op}_pair", None)), f"{name}.{op}_pair"
    for (alias, dev), target in B.ALIASES.items():
        assert alias in B.BACKENDS and (target, dev) in B.TABLE


def test_native_kernels_have_the_protocols_signatures():
    """Every native op (and pair kernel) takes the parameters of backends.Kernels, in order."""
    for (name, _dev), ops in B.TABLE.items():
        mod = B._import(name)
        for op in [o for o, i in ops.items() if i == B.NATIVE] + [
            f"{o}_pair" for d in mod.PAIRS.values() for o in d
        ]:
            want = list(inspect.signature(getattr(B.Kernels, op)).parameters)[1:]  # without self
            got = list(inspect.signature(getattr(mod, op)).parameters)
            assert got[: len(want)] == want, f"{name}.{op}{got} vs Kernels.{op}{want}"


def test_cuda_tensors_named_cpp_run_the_cuda_backend():
    """The old spelling: backend="cpp" on CUDA tensors is the cuda backend (one alias)."""
    assert B.ALIASES[("cpp", "cuda")] == "cuda"
    assert (
        B.route("cpp", "cuda", "bucket") == B.NATIVE and B.route("cpp", "cpu", "bucket") == B.NATIVE
    )
    assert B.route("cpp", "cuda", "cosine") == ("triton", "torch")
    assert B.route("cpp", "cuda", "knn_kth_distance") == ("knn_tiled",)
    assert B.route("triton", "cuda", "knn_kth_distance") == ("knn_tiled",)
    for name in B.BACKENDS:
        assert B.route(name, "cpu" if name != "cuda" else "cuda", "renyi") in (B.NATIVE, ("torch",))


def test_backends_reports_native_ops_and_fallbacks():
    info = ef.backends()
    assert set(info) == set(ef.BACKENDS)
    cuda = info["cuda"]["ops"]["cuda"]
    assert cuda["bucket"] == "native" and cuda["moments"] == "native"
    assert cuda["cosine"] == "triton or torch"
    assert cuda["knn_kth_distance"].startswith("knn_tiled")
    assert info["cuda"]["aliases"] == {"cpp": "cuda"}
    assert info["cpp"]["ops"]["cpu"]["knn_terms"] == "native"
    assert info["cpp"]["pairs"]["cpu"] == ["bucket", "moments"]
    assert info["cuda"]["reports_nonfinite"]["cuda"] == ["bucket", "moments"]
    assert info["triton"]["ops"]["cuda"]["knn_kth_distance"].startswith("knn_tiled")
    for name in ef.BACKENDS:
        for dev, ops in info[name]["ops"].items():
            assert ops["renyi"] in ("native", "torch") and ops["covariance"] in (
                "native",
                "torch",
            ), (name, dev)


def test_extension_limits_match_python():
    C = _ext.require()
    assert C.MAX_BINS == api.MAX_BINS
    from entrodrop_fast.ops import cpp_backend

    assert cpp_backend.KNN_FUSED_MAX_N == C.KNN_FUSED_MAX_N


# ------------------------------------------------------------------ moments, bucket, cosine


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_f", [False, True], ids=["x", "x+f"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_moments_bucket_cosine(be, shape, dtype, use_f, use_mask):
    small_enough(be, shape)
    x, f, mask = (t.to(be.dev) for t in data(shape, dtype))
    f = f if use_f else None
    mask = mask if use_mask else None
    name = f"{be.name} {shape} {dtype} f={use_f} mask={use_mask}"
    check_moments(ref_ops.moments(x, f, mask), be.op("moments")(x, f, mask), be.tol, name)
    for bins, exact in [(20, False), (80, True), (1, False), (7, False)]:
        check_bucket(be, x, f, mask, bins, exact, name)
    if shape[2] > 1:
        other = f if f is not None else data(shape, dtype, seed=1)[0].to(be.dev)
        check_cosine(be, x, other, mask, fused=use_f, name=name)
        check_bucket_cosine(be, x, other, mask, fused=use_f, name=name)
        check_bucket_cosine(be, x, other, mask, fused=use_f, bins=300, name=f"{name} 300 bins")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llm_like_and_interleaved(be, shape, dtype):
    """LLM-like values (a channel at 3000 + 50 z, one x400) and the channel-stride-2 layout
    with samples interleaved between tokens, masked."""
    small_enough(be, shape)
    x, f, m = (
        make(shape, dtype, be.dev),
        make(shape, dtype, be.dev, seed=1),
        make_mask(shape, be.dev),
    )
    xs = make(shape, dtype, be.dev, seed=2, strided=True)
    tol = be.tol
    check_moments(ref_ops.moments(x), be.op("moments")(x, None, None), tol, "x")
    check_moments(ref_ops.moments(x, f, m), be.op("moments")(x, f, m), tol, "x+f masked")
    check_moments(ref_ops.moments(xs, None, m), be.op("moments")(xs, None, m), tol, "strided")
    for bins in (1, 7, 80):
        check_bucket(be, xs, None, m, bins, False, "strided")
    if shape[2] > 1:
        for fused in (True, False):
            check_cosine(be, xs, f, m, fused, "strided")
            check_bucket_cosine(be, xs, f, m, fused, name="strided x")
            check_bucket_cosine(be, f, xs, m, fused, name="strided other")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bins", [1, 7, 20, 80])
def test_bucket_counts_exact(be, shape, dtype, bins):
    """The backends with a counts kernel: every bin count of the reference (a constant
    channel: all in bin 0)."""
    small_enough(be, shape)
    counts = be.counts()
    if counts is None:
        pytest.skip(f"{be.name} has no bin-count kernel (its H_d matches to 1e-12 instead)")
    x, f, m = (
        make(shape, dtype, be.dev),
        make(shape, dtype, be.dev, seed=1),
        make_mask(shape, be.dev),
    )
    x[..., 0] = 1.5
    assert torch.equal(
        counts(x, None, None, bins).long().cpu(), ref_counts(x, None, None, bins).cpu()
    )
    assert torch.equal(counts(x, f, m, bins).long().cpu(), ref_counts(x, f, m, bins).cpu())
    xs = make(shape, dtype, be.dev, seed=2, strided=True)
    assert torch.equal(counts(xs, None, m, bins).long().cpu(), ref_counts(xs, None, m, bins).cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["transposed", "sliced", "batch-permuted", "expanded"])
def test_strided_views(be, dtype, kind):
    x, f = strided_views(dtype, be.dev)[kind]
    if be.interpreted:
        x, f = x[:, :9], f[:, :9]
    assert not x.is_contiguous()
    g = torch.Generator().manual_seed(8)
    mask = (torch.rand(x.shape[0], 2 * x.shape[1], generator=g) > 0.2)[:, ::2]  # strided mask
    mask[:, :2] = True
    mask = mask.to(be.dev)
    for ff, mm in [(None, None), (f, mask)]:
        check_moments(ref_ops.moments(x, ff, mm), be.op("moments")(x, ff, mm), be.tol, kind)
        check_bucket(be, x, ff, mm, 20, False, kind)
    check_cosine(be, x, f, mask, True, kind)
    check_cosine(be, x, f, None, False, kind)


def test_large_offset_channels(be):
    """Channels 1e4x larger than the rest, an offset of 3e5, a huge first ("sink") token: the
    fp32 kernels keep their tolerance."""
    T, D = (300, 24) if be.interpreted else (3000, 96)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, T, D, generator=g)
    x[..., 3] = x[..., 3] * 1e4 + 3e5
    x[..., 7] = x[..., 7] * 1e-3 + 10.0
    x[:, 0, 5] = 2.0e5
    x[:, 0, 9] = -5.0e4
    x = x.to(be.dev)
    check_moments(ref_ops.moments(x), be.op("moments")(x, None, None), be.tol, "offset")
    f = llm_like(2, T, D, seed=12, outliers=False).to(be.dev)
    check_moments(ref_ops.moments(x, f), be.op("moments")(x, f, None), be.tol, "offset fused")


def test_bucket_hand_cases(be):
    # min == max: one bin, entropy 0; value equal to max in the last bin; evenly spread values.
    x = torch.tensor([[1.0, 2.0, 0.0], [1.0, 4.0, 1.0], [1.0, 6.0, 2.0], [1.0, 8.0, 3.0]])[None].to(
        be.dev
    )
    h = be.op("bucket")(x, None, None, 4, False)[0]
    assert h[0].item() == 0.0
    assert h[1].item() == pytest.approx(math.log(4.0), rel=1e-15)
    assert h[2].item() == pytest.approx(math.log(4.0), rel=1e-15)
    hp = be.op("bucket")(x, None, None, 6, True)[0]  # 2 empty bins each add 1e-10 * ln(1e10)
    assert hp[0].item() == pytest.approx(5 * 1e-10 * 23.025850929940457, rel=1e-9)


def test_bucket_ties_at_the_max_and_one_value_at_the_max(be, nan_empty):
    shape = (2, 41, 19)
    x, f, m = (
        make(shape, torch.bfloat16, be.dev),
        make(shape, torch.bfloat16, be.dev, seed=2),
        make_mask(shape, be.dev),
    )
    x[0, 7, 3] = x[0, :, 3].max()  # ties at the max go to the last bin
    x[1, :, 4] = 0.0
    x[1, 3, 4] = 1.0  # one value at the max, the rest at the min
    for paper_exact in (False, True):
        for args in [(x, None, None), (x, f, m)]:
            check_bucket(be, *args, 20, paper_exact, "ties")


def test_fp16_sum_past_fp16_range_is_finite(be, nan_empty):
    """X = F = 60000 in fp16: Y = 120000 is past fp16's range but finite in fp32, where every
    backend adds: no report, the reference's values, no warning from the public calls."""
    x, f, _ = bad_data(torch.float16, "clean", (3, 19, 21), be.dev)
    x[1, 3, 2] = f[1, 3, 2] = 60000.0
    check_bucket(be, x, f, None, 20, False, "fp16 sum")
    check_moments(ref_ops.moments(x, f), be.op("moments")(x, f, None), be.tol, "fp16 sum")
    check_cosine(be, x, f, None, True, "fp16 sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", module="numpy")
        h = ef.bucket_entropy(x, f, backend=be.name)
        d = ef.delta_entropy(x, f, "gaussian_diag", backend=be.name)
    assert_close(ref_ops.bucket(x, f, None, 20).sum(-1), h, 1e-12)
    assert_close(ef.delta_entropy(x, f, "gaussian_diag", backend="torch"), d, 1e-6, 1e-9)


# ------------------------------------------------------------------ knn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n,d,k",
    [(2, 1, 1), (3, 5, 2), (30, 7, 1), (37, 19, 5), (50, 12, 25), (257, 577, 25), (600, 33, 50)],
)
def test_knn_kth_distance(be, dtype, n, d, k, nan_empty):
    small_enough(be, (n, d))
    rtol, atol = be.tol.knn
    for outliers, dup in ((True, False), (False, True)):
        x = llm_like(n, d, seed=n, dtype=dtype, outliers=outliers).to(be.dev)
        if dup:
            x[min(4, n - 1)] = x[0]  # a duplicate row: distance 0 to an *other* row counts
        c = be.op("knn_kth_distance")(x, k)
        assert c.dtype == torch.float64 and c.shape == (n,)
        assert_close(
            ref_ops.knn_kth_distance(x.float(), k), c, rtol, atol, name=f"knn {n}x{d} k={k}"
        )
        xt = x.t().contiguous().t()  # column-major
        assert_close(
            ref_ops.knn_kth_distance(xt.float(), k),
            be.op("knn_kth_distance")(xt, k),
            rtol,
            atol,
            name="knn strided",
        )


def test_knn_duplicates(be):
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(16)).to(be.dev)
    x[10:20] = x[0]  # eleven identical rows: their 10 nearest others are at distance 0
    c = be.op("knn_kth_distance")(x, 10)
    assert (c[[0, *range(10, 20)]] == 0).all()
    assert_close(ref_ops.knn_kth_distance(x, 10), c, *be.tol.knn, name="knn duplicates")


# ------------------------------------------------------------------ outputs, pairs


def test_outputs_fully_overwritten(be, nan_empty):
    x, f, mask = (t.to(be.dev) for t in data((3, 40, 67), torch.bfloat16, seed=17))
    for out in be.op("moments")(x, f, mask).values():
        assert not out.isnan().any()
    assert not be.op("bucket")(x, f, mask, 20, False).isnan().any()
    for out in be.op("cosine")(x, f, mask, True):
        assert not out.isnan().any()
    assert not be.op("knn_kth_distance")(x[0], 5).isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pairs_are_the_two_single_calls(be, dtype, nan_empty):
    """Where a backend declares a pair kernel, its two outputs are the single calls' bit for
    bit (and the reference's to the single calls' tolerance)."""
    pairs = be.mod.PAIRS.get(be.dev, ())
    if not pairs:
        pytest.skip(f"{be.name} has no pair kernels on {be.dev}")
    shape = (3, 23, 37)
    x, f, m = (
        make(shape, dtype, be.dev, strided=True),
        make(shape, dtype, be.dev, seed=5),
        make_mask(shape, be.dev),
    )
    for mask in (None, m):
        if "bucket" in pairs:
            for bins, exact in ((13, False), (20, True)):
                hy, hx = B.pair_kernel(be.name, be.dev, "bucket")(x, f, mask, bins, exact)
                assert torch.equal(hy, be.op("bucket")(x, f, mask, bins, exact))
                assert torch.equal(hx, be.op("bucket")(x, None, mask, bins, exact))
                assert_close(
                    ref_ops.bucket(x, None, mask, bins, exact), hx, 1e-12, 1e-12, name="H(x)"
                )
        if "moments" in pairs:
            my, mx = B.pair_kernel(be.name, be.dev, "moments")(x, f, mask)
            ry, rx = be.op("moments")(x, f, mask), be.op("moments")(x, None, mask)
            for key in ry:
                assert torch.equal(my[key], ry[key]) and torch.equal(mx[key], rx[key]), key
            check_moments(ref_ops.moments(x, None, mask), mx, be.tol, "pair x")
            check_moments(ref_ops.moments(x, f, mask), my, be.tol, "pair y")


# ------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_report_exactly_the_bad_channels(be, dtype, case, nan_empty):
    """The ops a backend declares in REPORTS_NONFINITE: NaN exactly where Y holds NaN/Inf among
    the valid tokens (docs/CONTRACT.md), the reference's values elsewhere."""
    reports = set(be.mod.REPORTS_NONFINITE.get(be.dev, ()))
    if not reports & {"bucket", "moments", "cosine"}:
        pytest.skip(f"{be.name} reports no non-finite values on {be.dev}")
    x, f, mask = bad_data(dtype, case, (3, 19, 21), be.dev)
    for ff, m in ((None, None), (f, None), (f, mask)):
        bad, clean = bad_and_clean(x, ff, m)
        if "bucket" in reports:
            check_bad_bucket(be.op("bucket")(x, ff, m, 20, False), bad, clean, m)
            pair = B.pair_kernel(be.name, be.dev, "bucket")
            if ff is not None and pair is not None:
                hy, hx = pair(x, ff, m, 20, False)
                assert torch.equal(hy.isnan(), bad) and torch.equal(
                    hx.isnan(), bad_channels(x.float(), m)
                )
        if "moments" in reports:
            mo = be.op("moments")(x, ff, m)
            for k in ("mean", "m2", "min", "max"):
                assert torch.equal(mo[k].isnan(), bad), f"moments {k}"
            ref = ref_ops.moments(clean, None, m)
            assert_close(ref["count"], mo["count"], 0)
            ok = ~bad & (clean.abs().amax(1) < 1e18)
            assert_close(ref["m2"][ok], mo["m2"][ok], 1e-5, 1e-9, name="m2, clean channels")
            assert torch.equal(ref["min"][~bad], mo["min"][~bad]) and torch.equal(
                ref["max"][~bad], mo["max"][~bad]
            )
            pair = B.pair_kernel(be.name, be.dev, "moments")
            if ff is not None and pair is not None:
                my, mx = pair(x, ff, m)
                assert torch.equal(my["m2"].isnan(), bad) and torch.equal(
                    mx["max"].isnan(), bad_channels(x.float(), m)
                )
        if "cosine" in reports and ff is not None:
            s, _ = be.op("cosine")(x, ff, m, True)
            assert torch.equal(s.isnan(), bad.any(1) | bad_channels(x.float(), m).any(1)), "cosine"
            s, _ = be.op("cosine")(x, ff, m, False)
            want = (bad_channels(x.float(), m) | bad_channels(ff.float(), m)).any(1)
            if (
                case == "overflow" and be.name == "triton"
            ):  # x = y = 3e38: x.y overflows fp32 in the
                want[1] |= (
                    dtype != torch.float16
                )  # Triton kernel (NaN, as it always was; cpp's sums are wider)
            assert torch.equal(s.isnan(), want), "cosine with y"


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


def _outcome(be, call, x, f, **kw):
    """(result, error message, warning messages) of one public call on backend be."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            res, err = CALLS[call](x, f, backend=be.name, **kw), None
        except ValueError as e:
            res, err = None, str(e)
    # (numpy's and triton's own warnings inside the interpreter, e.g. "All-NaN slice", are not
    # the API's; the API's may point into the package, installed in site-packages)
    return res, err, [str(w.message) for w in rec if not w.filename.startswith(_FOREIGN)]


def _same(a, b, rtol):
    if a is None or b is None:
        return a is None and b is None
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return torch.equal(a.isnan(), b.isnan()) and bool(
        torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=rtol, atol=1e-9)
    )


@pytest.mark.parametrize("policy", ["raise", "omit"])
@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_api_same_results_errors_and_warnings_as_the_explicit_check(
    be, call, case, policy, monkeypatch
):
    """The public calls with the kernels' reports (no separate NaN/Inf pass where the backend
    declares REPORTS_NONFINITE and PAIRS) = the same calls with the API's explicit check first:
    errors, warnings, results; and clean input reads no separate pass."""
    decl = be.mod.REPORTS_NONFINITE.get(be.dev, ())
    if not decl:
        pytest.skip(
            f"{be.name} reports no non-finite values on {be.dev}: the explicit check always runs"
        )
    T = 11 if be.interpreted else 300
    x, f, mask = bad_data(
        torch.bfloat16 if case != "overflow" else torch.float32,
        case,
        (3, T, 10 if be.interpreted else 64),
        be.dev,
    )
    for m in (None, mask):
        got = _outcome(be, call, x, f, mask=m, nan_policy=policy)
        monkeypatch.setattr(be.mod, "REPORTS_NONFINITE", {})  # the explicit check, as before
        monkeypatch.setattr(be.mod, "PAIRS", {})
        want = _outcome(be, call, x, f, mask=m, nan_policy=policy)
        monkeypatch.undo()
        assert got[1] == want[1] and got[2] == want[2], (got[1:], want[1:])
        assert _same(got[0], want[0], 1e-9 if "gaussian" in call else 1e-12), (got[0], want[0])
        # bad among the valid tokens (fp16: 6e4 + 6e4 is finite in fp32; cosine_y adds nothing)
        hidden = case == "clean" or (case == "masked" and m is not None)
        y_bad = not hidden and not (case == "overflow" and call == "cosine_y")
        if hidden:
            assert got[1] is None and not got[2], got
        elif y_bad and policy == "raise":
            assert got[1] is not None and (
                "NaN or Inf" in got[1] or "overflowed float32" in got[1]
            ), got
        elif y_bad:
            assert got[1] is None and any("skipped" in w for w in got[2]), got


def test_api_clean_input_reads_no_prepass(be, monkeypatch):
    """Where the backend's kernels report non-finite values, clean input is read once (by the
    kernel), and bad input takes the exact path once."""
    decl = be.mod.REPORTS_NONFINITE.get(be.dev, ())
    if not decl:
        pytest.skip(f"{be.name} reports no non-finite values on {be.dev}")
    calls = []
    real = api._nonfinite_tokens
    monkeypatch.setattr(api, "_nonfinite_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, f, mask = bad_data(torch.bfloat16, "clean", (2, 11, 10), be.dev)
    op = {
        "bucket": "bucket",
        "gaussian_diag": "moments",
        "delta_bucket": "bucket",
        "delta_gaussian_diag": "moments",
        "cosine": "cosine",
        "cosine_y": "cosine",
    }
    for call in CALLS:
        if op[call] in decl:
            CALLS[call](x, f, backend=be.name, mask=mask)
    assert calls == [], "the default call ran the separate NaN/Inf pass"
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 1 token"):
        ef.bucket_entropy(x, f, backend=be.name)
    assert calls == [1], "bad input takes the exact path once"


def test_api_omit_equals_masking_and_the_reference(be):
    x, f, mask = bad_data(torch.float16, "nan_f", (3, 11, 10), be.dev)
    keep = mask.clone()
    keep[1, 5] = False
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        h = ef.bucket_entropy(x, f, mask=mask, nan_policy="omit", backend=be.name)
    assert torch.equal(h, ef.bucket_entropy(x, f, mask=keep, backend=be.name))
    assert_close(ref_ops.bucket(x, f, keep, 20).sum(-1), h, 1e-12, name="bucket")
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        d = ef.delta_entropy(x, f, "gaussian_diag", mask=mask, nan_policy="omit", backend=be.name)
    # (H(x) keeps token (1, 5): its x is finite, only f held the NaN)
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        want = ef.delta_entropy(
            x, f, "gaussian_diag", mask=mask, nan_policy="omit", backend="torch"
        )
    assert_close(want, d, 1e-6, 1e-9, name="delta gaussian_diag")


def test_bad_arguments_raise_value_error_from_the_extension():
    """One error convention at the C++ boundary: bad arguments are ValueError (CPU here; the
    CUDA launchers throw the same std::invalid_argument, tests/test_cuda_backend.py)."""
    C = _ext.require()
    x = torch.randn(1, 4, 3)
    out = torch.empty(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="bins must be in \\[1, 65536\\]"):
        C.bucket_cpu(
            x.data_ptr(), 0, 0, 0, [1, 4, 3], [12, 3, 1], [], [], 0, False, out.data_ptr(), 1
        )
    with pytest.raises(ValueError, match="dtype must be 0"):
        C.moments_cpu(
            x.data_ptr(), 0, 0, 5, [1, 4, 3], [12, 3, 1], [], [], *[out.data_ptr()] * 5, 1
        )
