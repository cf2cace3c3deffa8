"""knn reports NaN/Inf in Y = x (+ f) through its outputs (docs/CONTRACT.md, "Non-finite
values"): the fused kernel checks every valid row in its packing pass, so ef.knn_entropy
skips the separate validation pass and runs the exact check only when the kernel saw a
non-finite value. Errors, warnings and omitted results are those of the explicit check."""

import math

import pytest
import torch
from helpers import DTYPES, assert_close, llm_like

import entrodrop_fast as ef
from entrodrop_fast.ops import api
from entrodrop_fast.ops import cpp_backend as cpp
from entrodrop_fast.ops import reference as ref


def rows_of(x, f, mask, b):
    r = x[b].float() if f is None else x[b].float() + f[b].float()
    return r if mask is None else r[mask[b]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["x", "f", "x+f"])
@pytest.mark.parametrize(
    "B", [1, 4]
)  # one sample (its steps in parallel), whole samples per thread
def test_kernel_reports_nonfinite_per_sample(dtype, where, B):
    x = llm_like(B, 70, 33, seed=3, dtype=dtype)
    f = (0.1 * llm_like(B, 70, 33, seed=4)).to(dtype)
    bad = B - 1  # the last sample holds the bad value, in a valid token
    if where == "x":
        x[bad, 17, 5] = float("nan")
    elif where == "f":
        f[bad, 17, 5] = float("-inf")
    else:  # finite x and f whose fp32 sum overflows (fp16/bf16: only bf16 reaches 3e38)
        if dtype == torch.float16:
            pytest.skip("|x| + |f| <= 131008 in fp16: Y cannot overflow fp32")
        x[bad, 17, 5] = 3e38
        f[bad, 17, 5] = 3e38
        assert bool(torch.isfinite(x).all() and torch.isfinite(f).all())
    radii, count, logsum = cpp.knn_radii(x, f, None, 5)
    assert math.isnan(logsum[bad].item()) and radii[bad].isnan().all()
    assert count[bad].item() == 70
    for b in range(B - 1):  # the other samples are untouched
        want = ref.knn_kth_distance(rows_of(x, f, None, b), 5)
        assert_close(want, radii[b], 1e-9, name=f"sample {b}")
    # the same token masked out: nothing is reported, the radii are exact
    mask = torch.ones(B, 70, dtype=torch.bool)
    mask[bad, 17] = False
    radii, _, logsum = cpp.knn_radii(x, f, mask, 5)
    assert math.isfinite(logsum[bad].item())
    assert_close(
        ref.knn_kth_distance(rows_of(x, f, mask, bad), 5),
        radii[bad][mask[bad]],
        1e-9,
        name="masked",
    )


def test_kernel_reports_nonfinite_in_a_centre_row():
    # row 0 is one of the rows averaged for the centre: every distance would be NaN
    x = llm_like(1, 40, 9, seed=5)
    x[0, 0, 3] = float("inf")
    _, _, logsum = cpp.knn_radii(x, None, None, 3)
    assert math.isnan(logsum[0].item())


def test_large_sample_reports_nonfinite():
    # more than KNN_FUSED_MAX_N valid tokens: the tiled path, the same report
    x = llm_like(2, cpp.KNN_FUSED_MAX_N + 9, 6, seed=6)
    x[1, 300, 2] = float("nan")
    radii, _, logsum = cpp.knn_radii(x, None, None, 4)
    assert math.isnan(logsum[1].item()) and radii[1].isnan().all()
    assert_close(ref.knn_kth_distance(x[0], 4), radii[0], 1e-9, name="finite large sample")


def test_default_call_runs_no_separate_check(monkeypatch):
    calls = []
    real = api._nonfinite_tokens
    monkeypatch.setattr(api, "_nonfinite_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = llm_like(3, 50, 16, seed=7)
    h = ef.knn_entropy(x, k=4)
    assert calls == []  # finite input: the kernel's report sufficed
    assert_close(
        torch.stack([ef.knn_entropy(x[b], k=4, backend="torch") for b in range(3)]), h, 1e-9
    )
    x[1, 2, 3] = float("nan")
    calls.clear()
    with pytest.raises(ValueError, match="NaN or Inf in 1 token"):
        ef.knn_entropy(x, k=4)
    assert calls == [1]  # the exact check ran once, after the kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_omit_equals_masked_call(dtype):
    x = llm_like(2, 60, 20, seed=8, dtype=dtype)
    f = (0.1 * llm_like(2, 60, 20, seed=9)).to(dtype)
    x[0, 4, 1] = float("nan")
    f[1, 7, 0] = float("inf")
    keep_x = torch.ones(2, 60, dtype=torch.bool)
    keep_x[0, 4] = False  # x alone: only x's NaN
    keep_y = keep_x.clone()
    keep_y[1, 7] = False  # Y = x + f: f's Inf too
    for ff, keep in ((None, keep_x), (f, keep_y)):
        with pytest.warns(RuntimeWarning, match="skipped"):
            got = ef.knn_entropy(x, ff, k=5, nan_policy="omit")
        assert_close(ef.knn_entropy(x, ff, k=5, mask=keep), got, 0, name=f"f={ff is not None}")
        with pytest.warns(RuntimeWarning, match="skipped"):
            assert_close(
                ef.knn_entropy(x, ff, k=5, nan_policy="omit", backend="torch"),
                got,
                1e-9,
                name="torch backend",
            )


def test_overflow_of_x_plus_f_raises_with_its_message():
    x = llm_like(1, 30, 8, seed=10)
    f = torch.zeros_like(x)
    x[0, 3, 2] = f[0, 3, 2] = 3e38
    with pytest.raises(ValueError, match=r"Y = X \+ F overflowed float32 in 1 token"):
        ef.knn_entropy(x, f, k=3)
    # validate=False: the kernel's NaN comes back as it is
    assert math.isnan(ef.knn_entropy(x, f, k=3, validate=False).item())
