"""What a fresh user's test of the Gaussian (moments) estimators found in session 12, each
fixed: finite values whose fp32 squares overflow (|y| past ~1e18) or fall below fp32's
normal range gave inf, or a floored variance with a warning about *small* variances, on the
C++ kernel; the torch backend crashed on a tensor that requires grad; delta_entropy with
f=None returned zeros; var_floor=0 leaked numpy's divide-by-zero warning."""

import warnings

import pytest
import torch

import entrodrop_fast as ef
from entrodrop_fast.ops import cpp_backend as cpp
from entrodrop_fast.ops import reference as ref


def _both(fn):
    """fn(backend) on the default backend and on the torch reference, no warnings allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn("auto"), fn("torch")


@pytest.mark.parametrize("scale", [1e17, 3e18, 1e20, 1e30])
def test_huge_finite_values_match_the_reference(scale):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, 6, generator=g) * scale
    f = torch.randn(2, 300, 6, generator=g) * scale
    a, b = _both(lambda be: ef.gaussian_diag_entropy(x, backend=be))
    assert torch.isfinite(a).all(), a
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-6)
    a, b = _both(lambda be: ef.delta_entropy(x, f, "gaussian_diag", backend=be))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    m, r = cpp.moments(x, f, None), ref.moments(x, f, None)
    torch.testing.assert_close(m["m2"], r["m2"], rtol=1e-6, atol=0)
    assert torch.equal(m["min"], r["min"]) and torch.equal(m["max"], r["max"])


def test_one_token_at_the_top_of_fp32():
    x = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(2))
    x[0, 10, 0] = 3e38
    a, b = _both(lambda be: ef.gaussian_diag_entropy(x, backend=be))
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-6)
    # with omit: x + f overflows fp32 at that token, which is dropped from H(X + F)
    g = torch.Generator().manual_seed(3)
    x, f = torch.randn(2, 50, 8, generator=g), torch.randn(2, 50, 8, generator=g)
    x[0, 3, 2] = f[0, 3, 2] = 3e38
    with pytest.warns(RuntimeWarning, match="omit"):
        a = ef.delta_entropy(x, f, "gaussian_diag", nan_policy="omit")
    with pytest.warns(RuntimeWarning, match="omit"):
        b = ef.delta_entropy(x, f, "gaussian_diag", nan_policy="omit", backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-22, 1e-25, 1e-30])
def test_tiny_values_with_no_floor_match_the_reference(scale):
    x = torch.randn(2, 64, 4, generator=torch.Generator().manual_seed(4)) * scale
    a, b = _both(lambda be: ef.gaussian_diag_entropy(x, var_floor=0.0, backend=be))
    assert torch.isfinite(a).all(), a
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-6)


def test_torch_backend_takes_a_tensor_that_requires_grad():
    x = torch.randn(2, 10, 4, requires_grad=True)
    a, b = _both(lambda be: ef.gaussian_diag_entropy(x, backend=be))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_delta_entropy_without_f_raises():
    x = torch.randn(2, 10, 4)
    for method in ("gaussian_diag", "bucket", "knn"):
        with pytest.raises(ValueError, match="needs f"):
            ef.delta_entropy(x, None, method)


def test_no_floor_on_a_constant_channel_is_minus_inf_without_numpy_warnings():
    x = torch.randn(2, 10, 4)
    x[:, :, 1] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = ef.gaussian_diag_entropy(x, var_floor=0.0)
    assert torch.isneginf(h).all()


@pytest.mark.parametrize("omit", [False, True])
def test_delta_entropy_warnings_point_at_the_caller(omit):
    # the pair kernel's path warned about floored variances from inside api.py
    x, f = torch.randn(2, 20, 4), torch.randn(2, 20, 4)
    x[:, :, 1] = 0.5
    f[:, :, 1] = 0.0  # constant in x and in x + f
    if omit:
        x[0, 0, 2] = float("nan")
    with pytest.warns(RuntimeWarning) as rec:
        ef.delta_entropy(x, f, "gaussian_diag", nan_policy="omit" if omit else "raise")
    assert any("floored" in str(w.message) for w in rec)
    assert all(w.filename == __file__ for w in rec), [(w.filename, w.lineno) for w in rec]
