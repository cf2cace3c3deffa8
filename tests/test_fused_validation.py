"""Validation inside the CPU kernels (issue 12): bucket, moments and cosine report NaN/Inf in
Y = X (+ F) among the valid tokens through their outputs (NaN), so the API skips its
separate pre-pass on the cpp backend and takes the exact path only when the outputs show a
non-finite value (docs/CONTRACT.md, "Non-finite values").

The ground truth for every public call is the same call with the kernels' report switched
off (``explicit``: the API's pre-pass runs first, as before): results, errors and warnings
must be identical, whatever the input -- NaN/Inf in X, in F, only in X + F (fp32
overflow), in masked-out tokens, huge finite values.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from helpers import DTYPES, assert_close, tiny_model

import entrodrop_fast as ef
from entrodrop_fast import _ext
from entrodrop_fast.ops import api
from entrodrop_fast.ops import cpp_backend as cpp
from entrodrop_fast.ops import reference as R

pytestmark = pytest.mark.skipif(
    not cpp.available()[0], reason="the compiled extension is not built"
)

NAN, INF = float("nan"), float("inf")


@contextlib.contextmanager
def explicit():
    """The kernels' report switched off: the API validates with its pre-pass first."""
    saved = cpp.REPORTS_NONFINITE
    cpp.REPORTS_NONFINITE = {}
    try:
        yield
    finally:
        cpp.REPORTS_NONFINITE = saved


@pytest.fixture
def prepass(monkeypatch):
    """Counts the calls of the API's exact NaN/Inf scan."""
    calls = []
    real = api._nonfinite_tokens

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(api, "_nonfinite_tokens", counting)
    return calls


# ------------------------------------------------------------------ data


def data(dtype, case, B=3, T=37, D=21, seed=0):
    """x, f [B, T, D] and a mask with token (1, 9) masked out, with the bad values of `case`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    f = 0.5 * torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 9] = False
    mask[2, ::5] = False
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
    elif case == "inf_both":  # Inf - Inf = NaN in Y
        x[0, 4, 2] = INF
        f[0, 4, 2] = -INF
    elif case == "overflow":  # finite x and f; Y overflows fp32 (fp16: only fp16's range)
        x[1, 3, 2] = big
        f[1, 3, 2] = big
        x[0, 5, 1] = big  # cancelling: fine
        f[0, 5, 1] = -big
    elif case == "masked":  # every kind of bad value, only in masked-out tokens
        x[1, 9, 3] = NAN
        f[1, 9, 4] = INF
        x[2, 5, 0] = big
        f[2, 5, 0] = big
    elif case == "huge":  # finite values the kernels' fp32 sums overflow on (moments' mean / m2)
        wide = 1e30 if dtype != torch.float16 else 6e4
        x[:, :, 2] = torch.where(torch.arange(T) % 2 == 0, wide, -wide)
        x[:, :, 3] = big
    return x.to(dtype), f.to(dtype), mask


CASES = ["clean", "nan_x", "inf_x", "nan_f", "inf_f", "inf_both", "overflow", "masked", "huge"]


def _moment_state(x, f, mask=None, **kw):
    kw.pop("validate", None)
    st = ef.MomentState(x.shape[-1]).update(x, f, mask=mask, **kw)
    return torch.stack([st.mean, st.m2, st.min.double(), st.max.double()])


def _meter(x, f, mask=None, **kw):
    kw.pop("validate", None)
    return ef.EntropyMeter("gaussian_diag").update(x, f, mask=mask, **kw)


CALLS = {
    "bucket": lambda x, f, **kw: ef.bucket_entropy(x, f, **kw),
    "bucket_x": lambda x, f, **kw: ef.bucket_entropy(x, bins=7, **kw),
    "gaussian_diag": lambda x, f, **kw: ef.gaussian_diag_entropy(x, f, **kw),
    "delta_bucket": lambda x, f, **kw: ef.delta_entropy(x, f, "bucket", bins=9, **kw),
    "delta_gaussian_diag": lambda x, f, **kw: ef.delta_entropy(x, f, "gaussian_diag", **kw),
    "entropy": lambda x, f, **kw: ef.entropy(x, "bucket", f, bins=5, **kw),
    "cosine": lambda x, f, **kw: ef.cosine_importance(x, f, **kw),
    "cosine_y": lambda x, f, **kw: ef.cosine_importance(x, y=f, **kw),
    "bucket_and_cosine": lambda x, f, **kw: torch.stack(
        ef.bucket_entropy_and_cosine(x, f, bins=9, **kw)
    ),
    "bucket_and_cosine_y": lambda x, f, **kw: torch.stack(
        ef.bucket_entropy_and_cosine(x, y=f, **kw)
    ),
    "moment_state": _moment_state,
    "meter": _meter,
}


def outcome(call, x, f, **kw):
    """(result, error message, warning messages) of one call."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            res, err = CALLS[call](x, f, backend="cpp", **kw), None
        except ValueError as e:
            res, err = None, str(e)
    return res, err, [str(w.message) for w in rec]


def expect_bad(call, x, f, mask) -> bool:
    """Whether the call reads a NaN/Inf (or an fp32 overflow of x + f) among valid tokens."""
    keep = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
    xb = ~torch.isfinite(x.float()).all(-1)
    fb = ~torch.isfinite(f.float()).all(-1)
    yb = ~torch.isfinite(x.float() + f.float()).all(-1)
    bad = (
        xb
        if call == "bucket_x"
        else (xb | fb)
        if call in ("cosine_y", "bucket_and_cosine_y")
        else (xb | fb | yb)
    )
    return bool((bad & keep).any())


def same(a, b) -> bool:
    return (
        a is None
        and b is None
        or torch.equal(torch.nan_to_num(a, 7.0, 8.0, 9.0), torch.nan_to_num(b, 7.0, 8.0, 9.0))
        and torch.equal(a.isnan(), b.isnan())
    )


# ------------------------------------------------------------ the public calls = the explicit check


@pytest.mark.parametrize("policy", ["raise", "omit"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_same_results_errors_and_warnings_as_the_explicit_check(call, dtype, case, policy):
    x, f, mask = data(dtype, case)
    for m in (None, mask):
        got = outcome(call, x, f, mask=m, nan_policy=policy)
        with explicit():
            want = outcome(call, x, f, mask=m, nan_policy=policy)
        assert got[1] == want[1], f"error: {got[1]!r} != {want[1]!r}"
        assert got[2] == want[2], f"warnings: {got[2]} != {want[2]}"
        assert same(got[0], want[0]), f"result: {got[0]} != {want[0]}"
        if not expect_bad(call, x, f, m):
            assert got[1] is None and not any("skipped" in w for w in got[2]), got
        elif policy == "raise":
            assert got[1] is not None and (
                "NaN or Inf" in got[1] or "overflowed float32" in got[1]
            ), got
        else:
            assert got[1] is None and any("skipped" in w for w in got[2]), got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_y_overflow_only_in_x_plus_f(dtype):
    x, f, _ = data(dtype, "overflow")
    assert bool(torch.isfinite(x).all() and torch.isfinite(f).all())
    for call in (
        "bucket",
        "gaussian_diag",
        "delta_bucket",
        "delta_gaussian_diag",
        "cosine",
        "moment_state",
    ):
        with pytest.raises(ValueError, match=r"Y = X \+ F overflowed float32 in 1 token"):
            CALLS[call](x, f, backend="cpp")
    keep = torch.ones(x.shape[:2], dtype=torch.bool)
    keep[1, 3] = False
    with pytest.warns(RuntimeWarning, match=r"skipped 1 token.*overflowed float32"):
        h = ef.bucket_entropy(x, f, nan_policy="omit")
    assert torch.equal(h, ef.bucket_entropy(x, f, mask=keep))
    assert_close(R.bucket(x, f, keep, 20).sum(-1), h, 1e-12, name="omitted = masked, reference")


def test_fp16_sum_beyond_fp16_range_is_fine():
    x, f, _ = data(torch.float16, "overflow")  # 6e4 + 6e4 = 1.2e5: past fp16, not fp32
    h = ef.bucket_entropy(x, f)
    assert_close(R.bucket(x, f, None, 20).sum(-1), h, 1e-12)
    m = ef.gaussian_diag_entropy(x, f)
    assert bool(torch.isfinite(m).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_omit_equals_masking_and_the_reference(dtype):
    x, f, mask = data(dtype, "nan_x")
    keep = mask.clone()
    keep[1, 5] = False
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        h = ef.bucket_entropy(x, f, mask=mask, nan_policy="omit")
    assert torch.equal(h, ef.bucket_entropy(x, f, mask=keep))
    assert_close(R.bucket(x, f, keep, 20).sum(-1), h, 1e-12, name="bucket")
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        g = ef.gaussian_diag_entropy(x, f, mask=mask, nan_policy="omit")
    assert_close(
        ef.gaussian_diag_entropy(x, f, mask=keep, backend="torch"), g, 1e-5, name="gaussian_diag"
    )
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        c = ef.cosine_importance(x, f, mask=mask, nan_policy="omit")
    assert_close(ef.cosine_importance(x, f, mask=keep, backend="torch"), c, 1e-6, name="cosine")


# ------------------------------------------------------------- no pre-pass where the kernel reports


@pytest.mark.parametrize("call", sorted(CALLS))
def test_clean_input_reads_no_prepass(call, prepass):
    x, f, mask = data(torch.bfloat16, "clean")
    CALLS[call](x, f, backend="cpp", mask=mask)
    assert prepass == [], "the default call ran the separate NaN/Inf pass"
    CALLS[call](x, f, backend="torch", mask=mask)
    assert prepass, "the reference backend keeps its explicit check"


def test_bad_input_takes_the_exact_path(prepass):
    x, f, _ = data(torch.float32, "nan_f")
    with pytest.raises(ValueError, match="NaN or Inf in 1 token"):
        ef.bucket_entropy(x, f)
    assert len(prepass) == 1
    prepass.clear()
    ef.knn_entropy(x[0], k=3)  # knn (cpp, CPU) checks in its packing pass: finite x, no pass
    assert prepass == []
    with pytest.raises(ValueError, match="NaN or Inf in 1 token"):
        ef.knn_entropy(x, f, k=3)
    assert len(prepass) == 1
    prepass.clear()
    ef.renyi_entropy(x[0])  # O(N^2 D) estimators without such a kernel keep their pre-pass
    assert len(prepass) == 1


def test_errors_keep_their_order():
    x, f, _ = data(torch.float32, "nan_x")
    # NaN first, then the token count, then the backend, as before
    with pytest.raises(ValueError, match="NaN or Inf"):
        ef.bucket_entropy(x[:, 5:6], backend="cpp")
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        ef.bucket_entropy(x[:1, :1], backend="cpp")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ef.bucket_entropy(x, backend="nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        ef.bucket_entropy(torch.randn(3, 4), backend="nonsense")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ef.MomentState(5).update(x)
    with pytest.raises(ValueError, match="expects 5 channels"):
        ef.MomentState(5).update(torch.randn(3, 4))


def test_omit_leaving_too_few_tokens():
    x = torch.randn(3, 4)
    x[1:, 0] = NAN
    with (
        pytest.warns(RuntimeWarning, match="skipped 2 token"),
        pytest.raises(
            ValueError,
            match=r"at least 2 valid tokens: sample 0 has 1 after nan_policy='omit' skipped",
        ),
    ):
        ef.bucket_entropy(x, nan_policy="omit")
    m = torch.ones(4, 3, dtype=torch.bool)
    m[1, 1:] = m[3] = False  # samples 1 and 3 (a user's test: "one has 0" named neither)
    with pytest.raises(ValueError, match=r"sample 1 has 1, sample 3 has 0 \(0-based"):
        ef.bucket_entropy(torch.randn(4, 3, 5), mask=m)


# ------------------------------------------------------------------ the kernels' report


def _bad_channels(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """bool [B, D]: a non-finite value among the valid tokens."""
    bad = ~torch.isfinite(y)
    if mask is not None:
        bad &= mask[..., None]
    return bad.any(1)


def _views(dtype, case):
    x, f, mask = data(dtype, case, B=3, T=60, D=41)
    return {
        "contiguous": (x, f),
        "transposed": (
            x.transpose(1, 2).contiguous().transpose(1, 2),
            f.transpose(1, 2).contiguous().transpose(1, 2),
        ),
        "sliced": (x[:, ::2, 1:], f[:, 1::2, 1:]),
    }, mask


@pytest.mark.parametrize(
    "case", ["clean", "nan_x", "inf_x", "nan_f", "inf_f", "inf_both", "overflow", "masked"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_report_exactly_the_bad_channels(dtype, case):
    views, mask = _views(dtype, case)
    for name, (x, f) in views.items():
        mk = mask[:, : x.shape[1]]
        for ff, m in ((None, None), (f, None), (f, mk)):
            y = x.float() if ff is None else x.float() + ff.float()
            bad = _bad_channels(y, m)
            clean_y = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
            h = cpp.bucket(x, ff, m, 20, False)
            assert torch.equal(h.isnan(), bad), f"{name}: bucket NaN where {bad.nonzero().tolist()}"
            assert_close(
                R.bucket(clean_y, None, m, 20)[~bad], h[~bad], 1e-12, 1e-12, name=f"{name} bucket"
            )
            mo = cpp.moments(x, ff, m)
            ref = R.moments(clean_y, None, m)
            for k in ("mean", "m2", "min", "max"):
                assert torch.equal(mo[k].isnan(), bad), f"{name}: moments {k}"
            ok = ~bad & (
                clean_y.abs().amax(1) < 1e18
            )  # fp32 squares of 3e38 overflow: not compared
            assert_close(ref["m2"][ok], mo["m2"][ok], 1e-5, 1e-30, name=f"{name} m2")
            assert torch.equal(ref["min"][~bad], mo["min"][~bad]) and torch.equal(
                ref["max"][~bad], mo["max"][~bad]
            )
            if ff is not None:
                s, n = cpp.cosine(x, ff, m, True)
                bad_x = _bad_channels(x.float(), m).any(1) | bad.any(1)
                assert torch.equal(s.isnan(), bad_x), f"{name}: cosine"
                rs, rn = R.cosine(
                    torch.where(torch.isfinite(x), x, 0),
                    torch.where(torch.isfinite(ff), ff, 0),
                    m,
                    True,
                )
                assert_close(rs[~bad_x], s[~bad_x], 1e-6, 1e-5, name=f"{name} cosine")
                assert torch.equal(rn, n)
                s, _ = cpp.cosine(x, ff, m, False)
                bad_xy = (_bad_channels(x.float(), m) | _bad_channels(ff.float(), m)).any(1)
                assert torch.equal(s.isnan(), bad_xy), f"{name}: cosine with y"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moments_report_in_any_token_range(dtype):
    # one sample over two threads (the token range is split in parts), NaN in the second
    # part; and a tail block of channels (D not a multiple of 32)
    x = torch.randn(1, 300, 450)
    x[0, 250, 449] = NAN
    x[0, 290, 3] = INF
    mo = cpp.moments(x.to(dtype))
    bad = torch.zeros(1, 450, dtype=torch.bool)
    bad[0, 449] = bad[0, 3] = True
    assert torch.equal(mo["mean"].isnan(), bad) and torch.equal(mo["m2"].isnan(), bad)


def test_bucket_report_on_long_samples():
    # > 2048 tokens: the two-sweep (streamed) path
    x = torch.randn(1, 2100, 300)
    x[0, 2099, 299] = NAN
    x[0, 7, 0] = -INF
    h = cpp.bucket(x, None, None, 20, False)
    assert h.isnan().nonzero().tolist() == [[0, 0], [0, 299]]
    clean = torch.where(torch.isfinite(x), x, 0)
    assert_close(R.bucket(clean, None, None, 20)[0, 1:299], h[0, 1:299], 1e-12, 1e-12)


def test_huge_finite_values_are_not_reported():
    # +-1e30 (squared deviations overflow fp32) and 3e38 (the fp32 chunk sum overflows):
    # finite, so no NaN from the report; the outputs are what the kernel always gave
    x = torch.randn(2, 40, 8)
    x[:, :, 2] = torch.where(torch.arange(40) % 2 == 0, 1e30, -1e30)
    x[:, :, 3] = 3e38
    assert not cpp.bucket(x, None, None, 20, False).isnan().any()
    mo = cpp.moments(x)
    assert not mo["min"].isnan().any() and not mo["max"].isnan().any()
    s, _ = cpp.cosine(x, x, None, False)
    assert bool(torch.isfinite(s).all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the constant channel is floored (a warning)
        warnings.filterwarnings("error", message="nan_policy")  # but nothing is omitted
        ef.gaussian_diag_entropy(x, nan_policy="omit")
        ef.bucket_entropy(x, nan_policy="omit")


# ------------------------------------------------------------------ validate=False: NaN is safe


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_validate_false_nan_gives_nan(dtype):
    x, f, mask = data(dtype, "nan_x")
    assert torch.isnan(ef.bucket_entropy(x, f, validate=False, backend="cpp")).tolist() == [
        False,
        True,
        False,
    ]
    assert torch.isnan(ef.gaussian_diag_entropy(x, f, validate=False, backend="cpp")).tolist() == [
        False,
        True,
        False,
    ]
    assert torch.isnan(ef.cosine_importance(x, f, validate=False, backend="cpp")).tolist() == [
        False,
        True,
        False,
    ]
    mask[1, 5] = False  # the NaN token masked out: all finite
    assert bool(
        torch.isfinite(ef.bucket_entropy(x, f, mask=mask, validate=False, backend="cpp")).all()
    )


def _guarded(n, dtype, guard=64):
    """An output buffer of n elements followed by a guard of sentinels."""
    return torch.full((n + guard,), -12345.0, dtype=dtype)


@pytest.mark.parametrize("bins", [1, 20, 65536])
@pytest.mark.parametrize("T", [70, 2100], ids=["cached", "streamed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_stay_in_bounds(dtype, T, bins):
    """All-bad inputs straight to the kernels (no validation): nothing written past the
    outputs, nothing read outside the view (a NaN border around it must not show)."""
    C = _ext.require()
    B, D = 2, 35
    base = torch.full((B + 2, T + 2, D + 2), NAN)
    x = base[1:-1, 1:-1, 1:-1]
    x.copy_(torch.randn(B, T, D))
    x[0, ::3, ::2] = NAN
    x[0, 1::3, 1::2] = INF
    x[0, 2::3, 1::2] = -INF
    x = base.to(dtype)[1:-1, 1:-1, 1:-1]
    code, sh, st = cpp.DTYPE_CODES[dtype], [B, T, D], list(x.stride())
    out = _guarded(B * D, torch.float64)
    C.bucket_cpu(x.data_ptr(), 0, 0, code, sh, st, [], [], bins, False, out.data_ptr(), 2)
    assert bool((out[B * D :] == -12345.0).all()), "bucket wrote past its output"
    h = out[: B * D].view(B, D)
    assert bool(h[0].isnan().all()) and bool(torch.isfinite(h[1]).all())
    assert_close(
        R.bucket(x[1:].contiguous(), None, None, bins), h[1:], 1e-12, 1e-12, name="sample 1"
    )
    outs = (
        [_guarded(B, torch.float64)]
        + [_guarded(B * D, torch.float64) for _ in range(2)]
        + [_guarded(B * D, torch.float32) for _ in range(2)]
    )
    C.moments_cpu(x.data_ptr(), 0, 0, code, sh, st, [], [], *[o.data_ptr() for o in outs], 2)
    for o, n in zip(outs, [B] + [B * D] * 4, strict=True):
        assert bool((o[n:] == -12345.0).all()), "moments wrote past an output"
    assert bool(outs[2][:D].isnan().all()) and bool(torch.isfinite(outs[2][D : B * D]).all())
    s, c = _guarded(B, torch.float64), _guarded(B, torch.float64)
    C.cosine_cpu(
        x.data_ptr(), x.data_ptr(), 0, code, sh, st, st, [], True, s.data_ptr(), c.data_ptr(), 2
    )
    assert bool((s[B:] == -12345.0).all()) and bool((c[B:] == -12345.0).all())
    assert math.isnan(s[0]) and math.isfinite(s[1]) and c[:B].tolist() == [T, T]


# ------------------------------------------------------------------ the profiler's taps


def _stats(methods=("bucket",), name="llama", backend="cpp", mask=None):
    from entrodrop_fast.models import get_adapter
    from entrodrop_fast.profile.taps import BlockStatistics, TapSettings

    ad = get_adapter(tiny_model(name, seed=3))
    return BlockStatistics(ad, 2, TapSettings(tuple(methods), backend=backend), mask=mask)


@pytest.mark.parametrize("methods", [("bucket",), ("gaussian_diag",), ("bucket", "gaussian_diag")])
def test_taps_read_no_tensor_for_the_check_on_cpp(methods, monkeypatch):
    from entrodrop_fast.profile.taps import BlockStatistics

    def forbidden(self, point, t):
        raise AssertionError("the taps ran their own finiteness pass")

    monkeypatch.setattr(BlockStatistics, "_check_finite", forbidden)
    st = _stats(methods)
    x = torch.randn(2, 16, 12)
    st.on_input(0, x)
    for m in methods:
        assert_close(ef.entropy(x, m, backend="torch"), st._h[m][0], 1e-5, name=m)
    with pytest.raises(AssertionError, match="own finiteness pass"):  # renyi's path does not report
        _stats(("bucket", "renyi")).on_input(0, x)


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_taps_with_cosine_alone_read_no_tensor_for_the_check(name, monkeypatch):
    """--method cosine alone (a fresh user's test: a t.sum() per point): the cpp cosine's own
    NaN report stands in for the pass, and a NaN still raises, naming the point that holds it
    (x's: r0, or Y's)."""
    from entrodrop_fast.models import get_adapter
    from entrodrop_fast.profile.taps import BlockStatistics, TapSettings

    def forbidden(self, point, t):
        raise AssertionError("the taps ran their own finiteness pass")

    monkeypatch.setattr(BlockStatistics, "_check_finite", forbidden)
    ad = get_adapter(tiny_model(name, seed=3))
    st = BlockStatistics(ad, 2, TapSettings((), cosine=True, backend="cpp"))
    x, f = torch.randn(2, 16, 12), torch.randn(2, 16, 12)
    st.on_input(0, x)
    st.on_attn(0, x, f)
    if name == "llama":  # sequential: the attention's Y is the model's own m_0
        st.on_mid(0, x, x + f)
    want = ef.cosine_importance(x, f, backend="torch")
    assert_close(want, st._cos["attn"][0], 1e-6, 1e-7, name="attn cosine")
    bad = x.clone()
    bad[1, 3, 4] = NAN
    y_point = "a0" if name == "gpt_neox" else "m0"
    # fp32 activations: not fp16 overflow (the hint used to suggest fp32 to an fp32 model)
    with pytest.raises(RuntimeError, match="NaN or Inf at r0 .the activations are float32, so not"):
        st.on_attn(0, bad, f) if name == "gpt_neox" else st.on_mid(0, bad, x + f)
    with pytest.raises(RuntimeError, match=f"NaN or Inf at {y_point}"):
        st.on_attn(0, x, bad) if name == "gpt_neox" else st.on_mid(0, x, bad)
    with pytest.raises(AssertionError, match="own finiteness pass"):  # the reference: no report
        BlockStatistics(ad, 2, TapSettings((), cosine=True, backend="torch")).on_input(0, x)


@pytest.mark.parametrize("methods", [("bucket",), ("gaussian_diag",)])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_taps_raise_on_nan_and_on_y_overflow(methods, backend):
    st = _stats(methods, "gpt_neox", backend)  # parallel residual: attn's Y = X + F is fused
    x = torch.randn(2, 16, 12)
    bad = x.clone()
    bad[1, 3, 4] = NAN
    with pytest.raises(RuntimeError, match="the residual stream holds NaN or Inf at r0"):
        st.on_input(0, bad)
    f = torch.randn(2, 16, 12)
    x[0, 2, 5] = f[0, 2, 5] = 3e38  # finite, but X + F overflows fp32
    if backend == "cpp":  # (the reference backend's taps check x and f by a sum each: finite)
        with pytest.raises(RuntimeError, match="the residual stream holds NaN or Inf at a0"):
            st.on_attn(0, x, f)
    x[0, 2, 5] = f[0, 2, 5] = 1.0
    st.on_attn(0, x, f)  # finite: fine
    assert bool(torch.isfinite(st._h[methods[0]][st._pidx["a0"]]).all())


def test_taps_ignore_masked_tokens_and_huge_finite_values():
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 3] = False
    st = _stats(("bucket", "gaussian_diag"), mask=mask)
    x = torch.randn(2, 16, 12)
    x[1, 3, 4] = NAN  # padding: not looked at
    x[:, :, 7] = torch.where(
        torch.arange(16) % 2 == 0, 1e30, -1e30
    )  # finite, fp32 squares overflow
    st.on_input(0, x)
    assert bool(torch.isfinite(st._h["bucket"][0]).all())
    want = ef.gaussian_diag_entropy(
        x, mask=mask, backend="cpp"
    )  # what the estimator gives, inf here
    assert torch.equal(want, st._h["gaussian_diag"][0])


# ---------------------------------------------------------------- the benchmark of the public calls


def test_bench_calls_command(tmp_path, capsys):
    import json

    from entrodrop_fast.cli import main

    out = tmp_path / "calls.json"
    args = [
        "bench",
        "--calls",
        "--shapes",
        "2x8x16,9x16",
        "--dtypes",
        "fp32,bf16",
        "--repeat",
        "1",
        "--min-seconds",
        "0",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| call | shape | dtype | reads | default ms | validate=False ms" in table
    rows = json.loads(out.read_text())
    assert {(r["estimator"], tuple(r["shape"]), r["dtype"]) for r in rows} == {
        (c, s, d)
        for c in (
            "bucket",
            "gaussian_diag",
            "delta_bucket",
            "delta_gaussian_diag",
            "cosine",
            "bucket_and_cosine",
        )
        for s in ((2, 8, 16), (9, 16))
        for d in ("fp32", "bf16")
    }
    for r in rows:
        pair = r["estimator"] in (
            "delta_bucket",
            "delta_gaussian_diag",
            "cosine",
            "bucket_and_cosine",
        )
        assert r["reads"] == ("x,f" if pair else "x") and r["mode"] == "calls"
        n = math.prod(r["shape"]) * (4 if r["dtype"] == "fp32" else 2)
        assert r["bytes"] == n * (2 if pair else 1)
        assert r["default_over_novalidate"] == pytest.approx(r["default_s"] / r["novalidate_s"])
        assert r["default_roofline_frac"] == pytest.approx(r["roofline_s"] / r["default_s"])
        assert min(r["default_s"], r["novalidate_s"], r["roofline_s"]) > 0
    assert main(args) == 0  # its own JSON is replaced
    assert main(["bench", "--calls", "--estimators", "knn"]) == 1
    assert "unknown call knn" in capsys.readouterr().err


# ---------------------------------------------------------------- byte-plane counting, pair kernels


@pytest.mark.parametrize("T", [70, 300, 2100], ids=["cached", "two-blocks", "streamed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bucket_counting_paths_equal_reference(dtype, T):
    # byte planes up to 255 bins (blocks of 255 rows), scalar counts beyond; 130 channels:
    # two 64-channel strips and a tail of 2 in the last tile
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, T, 130, generator=g)
    x[:, :, 3] = 1.5  # a constant channel
    x = x.to(dtype)
    mask = torch.rand(2, T, generator=g) > 0.1
    for bins in (1, 2, 7, 8, 9, 20, 64, 255, 256, 1000):
        for m in (None, mask):
            assert_close(
                R.bucket(x, None, m, bins),
                cpp.bucket(x, None, m, bins, False),
                1e-12,
                1e-12,
                name=f"bins={bins}",
            )


@pytest.mark.parametrize("case", ["clean", "nan_x", "overflow", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pair_kernels_equal_the_single_kernels(dtype, case):
    for T in (60, 2100):
        x, f, mask = data(dtype, case, B=3, T=T, D=41)
        views = {
            "contiguous": (x, f),
            "transposed": (x.transpose(1, 2).contiguous().transpose(1, 2), f[:, :, :]),
            "sliced": (x[:, ::2, 1:], f[:, 1::2, 1:]),
        }
        for name, (xv, fv) in views.items():
            for m in (None, mask[:, : xv.shape[1]]):
                for bins in (20, 300):
                    hy, hx = cpp.bucket_pair(xv, fv, m, bins, False)
                    assert same(hy, cpp.bucket(xv, fv, m, bins, False)) and same(
                        hx, cpp.bucket(xv, None, m, bins, False)
                    ), f"{name} bucket"
                my, mx = cpp.moments_pair(xv, fv, m)
                for got, want in ((my, cpp.moments(xv, fv, m)), (mx, cpp.moments(xv, None, m))):
                    for k in want:
                        assert same(got[k].double(), want[k].double()), f"{name} moments {k}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_entropy_reads_the_pair_once(dtype, monkeypatch):
    x, f, mask = data(dtype, "clean")
    calls = []
    for op in ("bucket", "moments"):
        real = getattr(cpp, f"{op}_pair")
        monkeypatch.setattr(
            cpp, f"{op}_pair", lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k)
        )
    for method in ("bucket", "gaussian_diag"):
        got = ef.delta_entropy(x, f, method, mask=mask, backend="cpp")
        want = ef.entropy(x, method, f, mask=mask, backend="cpp") - ef.entropy(
            x, method, mask=mask, backend="cpp"
        )
        assert torch.equal(got, want), method
        assert_close(
            ef.delta_entropy(x, f, method, mask=mask, backend="torch"), got, 1e-5, 1e-6, name=method
        )
    assert len(calls) == 2
    with pytest.raises(TypeError, match="bucket_entropy.. got an unexpected keyword argument 'k'"):
        ef.delta_entropy(x, f, "bucket", k=3)
    xd, fd = x.clone(), f.clone()
    xd[..., :3] = 1.0  # 3 dead channels in x, 2 of them in Y
    fd[..., 1:3] = 0.0
    got = outcome("delta_gaussian_diag", xd, fd)
    saved = cpp.PAIRS
    cpp.PAIRS = {}
    try:
        want = outcome("delta_gaussian_diag", xd, fd)
    finally:
        cpp.PAIRS = saved
    assert (
        got[2]
        == want[2]
        == [
            "gaussian_diag: 6 channel variance(s) below var_floor=1e-12 were floored",
            "gaussian_diag: 9 channel variance(s) below var_floor=1e-12 were floored",
        ]
    )
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_bucket_counting_isa_paths_agree(isa, tmp_path):
    """The counting paths other CPUs take (AVX2 byte compares, portable byte compares) give
    the counts of the default path (run in a child process: the choice is read from the
    environment)."""
    import subprocess
    import sys

    code = (
        "import torch, sys\n"
        "from entrodrop_fast.ops import cpp_backend as cpp\n"
        "g = torch.Generator().manual_seed(9)\n"
        "x = torch.randn(2, 300, 130, generator=g).to(torch.bfloat16)\n"
        "f = torch.randn(2, 300, 130, generator=g).to(torch.bfloat16)\n"
        "out = [cpp.bucket(x, None, None, b, False) for b in (1, 5, 8, 20, 32, 33, 80, 255)]\n"
        "out += list(cpp.bucket_pair(x, f, None, 20, False))\n"
        "torch.save(out, sys.argv[1])\n"
    )
    import os

    env = {**os.environ, "ENTRODROP_COUNT_ISA": isa}
    for name, e in (("here", os.environ), (isa, env)):
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"{name}.pt")], env=e, check=True
        )
    here, there = torch.load(tmp_path / "here.pt"), torch.load(tmp_path / f"{isa}.pt")
    for a, b in zip(here, there, strict=True):
        assert torch.equal(a, b)
