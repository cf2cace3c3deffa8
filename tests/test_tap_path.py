"""The profiler's tap path: kernels it calls with a given Y (not X + F fused)."""

import pytest
import torch
from helpers import tiny_model

from entrodrop_fast import _ext
from entrodrop_fast.ops import cpp_backend, reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason="compiled extension not built")


@pytest.mark.parametrize("shape", [(1, 2, 3), (2, 5, 17), (1, 256, 576), (3, 7, 1031)])
def test_cosine_given_y_equals_fused(shape):
    # fp32: Y = x + f formed outside equals the fused kernel's own fp32 sum, element for element,
    # so the two paths (vectorised separately) give the same cosine per token; the sum over
    # tokens depends on how the pool's threads shared them (dynamic), so to the last bits only
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    f = torch.randn(shape, generator=g) * 3
    s_fused, c_fused = cpp_backend.cosine(x, f, None, True)
    s_y, c_y = cpp_backend.cosine(x, x + f, None, False)
    torch.testing.assert_close(s_fused, s_y, rtol=1e-13, atol=1e-13)
    assert torch.equal(c_fused, c_y)
    # one token per sample: no sum to reorder, bit for bit
    s1, _ = cpp_backend.cosine(x[:, :1], f[:, :1], None, True)
    s2, _ = cpp_backend.cosine(x[:, :1], (x + f)[:, :1], None, False)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_cosine_given_y_matches_reference(dtype, strided):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 70 if strided else 35, generator=g).to(dtype)
    y = torch.randn(2, 9, 70 if strided else 35, generator=g).to(dtype)
    if strided:
        x, y = x[:, :, ::2], y[:, :, 1::2]
    mask = torch.rand(2, 9, generator=g) > 0.3
    mask[:, 0] = True
    got = cpp_backend.cosine(x, y, mask, False)
    want = reference.cosine(x, y, mask, False)
    torch.testing.assert_close(got[0], want[0].to(got[0].dtype), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1], want[1].to(got[1].dtype))


def _knn_stats():
    from entrodrop_fast.models import get_adapter
    from entrodrop_fast.profile.taps import BlockStatistics, TapSettings

    ad = get_adapter(tiny_model("llama", seed=3))
    return BlockStatistics(
        ad, 2, TapSettings(("bucket", "knn"), backend="cpp", entropy_opts={"knn": {"k": 3}})
    )


def test_taps_knn_reports_nonfinite_without_own_pass(monkeypatch):
    import entrodrop_fast as ef
    from entrodrop_fast.profile.taps import BlockStatistics

    def forbidden(self, point, t):
        raise AssertionError("the taps ran their own finiteness pass")

    monkeypatch.setattr(BlockStatistics, "_check_finite", forbidden)
    x = torch.randn(2, 16, 12)
    st = _knn_stats()
    st.on_input(0, x)  # bucket and knn kernels both report: no pass of the taps' own
    torch.testing.assert_close(
        st._h["knn"][0], ef.knn_entropy(x, k=3, backend="torch"), rtol=1e-9, atol=1e-9
    )
    bad = x.clone()
    bad[1, 5, 2] = float("inf")
    with pytest.raises(RuntimeError, match="the residual stream holds NaN or Inf at r0"):
        _knn_stats().on_input(0, bad)


def test_delta_entropy_warnings_point_at_the_caller():
    import warnings

    import entrodrop_fast as ef

    x = torch.randn(2, 16, 8)
    f = torch.randn(2, 16, 8)
    x[0, 3, 2] = float("nan")
    for method in ("bucket", "gaussian_diag", "knn"):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ef.delta_entropy(
                x, f, method, nan_policy="omit", **({"k": 3} if method == "knn" else {})
            )
        skipped = [w for w in rec if "skipped" in str(w.message)]
        assert skipped and all(w.filename == __file__ for w in skipped), [
            (w.filename, str(w.message)) for w in rec
        ]
