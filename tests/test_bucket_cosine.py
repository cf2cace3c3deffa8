"""bucket_entropy_and_cosine: the bucket entropy of Y and the cosine importance of (x, Y)
from one read (issue 12, "cosine computed in the same launch as the entropy statistics"),
against the two estimators it replaces and the reference; and the profiler's taps using it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_close, tiny_model

import entrodrop_fast as ef
from entrodrop_fast.ops import cpp_backend as cpp
from entrodrop_fast.ops import reference as R

pytestmark = pytest.mark.skipif(
    not cpp.available()[0], reason="the compiled extension is not built"
)


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    o = torch.randn(shape, generator=g)
    x[..., 0] += 40.0  # a massive channel, as in LLM hidden states
    return x.to(dtype), o.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused", [True, False], ids=["x+f", "y"])
@pytest.mark.parametrize(
    "shape",
    [(1, 2100, 70), (2, 2049, 64)],  # longer than the cached tile: the two kernels in turn
    ids=lambda s: "x".join(map(str, s)),
)
def test_long_samples_take_the_two_kernels(shape, fused, dtype):
    x, o = _pair(shape, dtype)
    mask = torch.rand(shape[:2], generator=torch.Generator().manual_seed(1)) > 0.2
    h, s, n = cpp.bucket_cosine(x, o, None, mask) if fused else cpp.bucket_cosine(o, None, x, mask)
    y, f = (x, o) if fused else (o, None)
    assert torch.equal(h, cpp.bucket(y, f, mask))
    rs, rn = R.cosine(x, o, mask, fused)
    assert torch.equal(n, rn)
    assert_close(rs, s, rtol=1e-6, atol=1e-6 * float(rn.max()), name="cosine")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_sums_agree_with_the_cosine_kernel(dtype):
    """Shapes of the profiler (256 tokens, D = 576 and 4096) and odd ones: the histograms are
    bucket_cpu's bit for bit, the cosine sums cosine_cpu's to fp32 rounding."""
    for shape in [(2, 256, 576), (1, 256, 4096), (3, 5, 65), (2, 40, 130), (1, 1, 64)]:
        x, o = _pair(shape, dtype, seed=sum(shape))
        for fused in (True, False):
            h, s, n = (
                cpp.bucket_cosine(x, o, None, None, 20)
                if fused
                else cpp.bucket_cosine(o, None, x, None, 20)
            )
            y, f = (x, o) if fused else (o, None)
            assert torch.equal(h, cpp.bucket(y, f, None, 20)), shape
            cs, cn = cpp.cosine(x, o, None, fused)
            assert torch.equal(n, cn)
            assert_close(cs, s, rtol=1e-6, atol=1e-6 * shape[1], name=f"{shape} {fused}")


def test_kernel_refuses_both_or_neither():
    x, o = _pair((1, 4, 8), torch.float32)
    C = cpp._ext.require()
    args = cpp._inputs(x, o, None)
    for f, c in ((args[1], o.data_ptr()), (0, 0)):
        with pytest.raises(ValueError, match="exactly one of f"):
            C.bucket_cosine_cpu(
                args[0], f, c, 0, args[3], args[4], args[5], args[5], args[5], [],
                20, False, 1, 1, 1, 1,
            )  # fmt: skip


def test_backend_function_checks_what_the_kernel_cannot():
    """cpp_backend.bucket_cosine (called by other tools as a backend, past the API's checks):
    a partner of another shape is refused (the kernel would read it with x's shape), one of
    another dtype read as fp32, exactly."""
    x, o = _pair((2, 9, 70), torch.bfloat16)
    with pytest.raises(ValueError, match="c must have the shape of x"):
        cpp.bucket_cosine(o, None, x[:, :5])
    h, s, n = cpp.bucket_cosine(o, None, x.float())
    h2, s2, n2 = cpp.bucket_cosine(o.float(), None, x.float())
    assert torch.equal(h, h2) and torch.equal(s, s2) and torch.equal(n, n2)
    assert torch.equal(h, cpp.bucket(o))


def test_overflowing_fp32_products_are_redone_in_fp64():
    """|values| near 1e20: fp32 squares overflow, the row is summed again in fp64 (finite)."""
    x, o = _pair((2, 9, 80), torch.float32)
    x[0, 3] *= 1e20
    o[1, 4] *= 1e20
    for fused in (True, False):
        h, s, n = cpp.bucket_cosine(x, o, None, None) if fused else cpp.bucket_cosine(o, None, x)
        rs, rn = R.cosine(x, o, None, fused)
        assert bool(torch.isfinite(s).all())
        assert_close(rs, s, rtol=1e-6, atol=1e-5, name=f"fused={fused}")


# ---------------------------------------------------------------- the public function


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equals_the_two_estimators(backend, dtype):
    x, o = _pair((3, 33, 96), dtype)
    mask = torch.ones(3, 33, dtype=torch.bool)
    mask[1, 5:9] = False
    for kw in ({"bins": 20}, {"bins": 80, "paper_exact": True}):
        h, c = ef.bucket_entropy_and_cosine(x, o, mask=mask, backend=backend, **kw)
        assert torch.equal(h, ef.bucket_entropy(x, o, mask=mask, backend=backend, **kw))
        assert_close(ef.cosine_importance(x, o, mask=mask, backend=backend), c, 1e-6, 1e-8)
        h, c = ef.bucket_entropy_and_cosine(x, y=o, mask=mask, backend=backend, **kw)
        assert torch.equal(h, ef.bucket_entropy(o, mask=mask, backend=backend, **kw))
        assert_close(ef.cosine_importance(x, y=o, mask=mask, backend=backend), c, 1e-6, 1e-8)


def test_two_d_and_numpy_inputs():
    x, o = _pair((40, 24), torch.float32)
    h, c = ef.bucket_entropy_and_cosine(x, o)
    assert h.shape == c.shape == () and h.dtype == torch.float64
    hn, cn = ef.bucket_entropy_and_cosine(x.numpy(), y=o.numpy())
    assert isinstance(hn, np.ndarray) and isinstance(cn, np.ndarray)
    assert hn == pytest.approx(float(ef.bucket_entropy(o)), rel=0, abs=0)
    assert cn == pytest.approx(float(ef.cosine_importance(x, y=o)), rel=1e-6)


def test_bad_calls_name_what_was_wrong():
    x, o = _pair((2, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="exactly one of f"):
        ef.bucket_entropy_and_cosine(x, o, y=o)
    with pytest.raises(ValueError, match="exactly one of f"):
        ef.bucket_entropy_and_cosine(x)
    with pytest.raises(ValueError, match="y must have the shape of x"):
        ef.bucket_entropy_and_cosine(x, y=o[:, :4])
    with pytest.raises(ValueError, match="bins must be"):
        ef.bucket_entropy_and_cosine(x, o, bins=0)
    with pytest.raises(ValueError, match="2..16 bins already resolve"):  # the limit explained
        ef.bucket_entropy_and_cosine(x, o, bins=65537)
    for bad in ("yes", None, 1):  # a user's test: "yes" and None were taken as truthy / falsy
        for fn in (
            ef.bucket_entropy_and_cosine,
            ef.bucket_entropy,
            lambda x, o, **kw: ef.delta_entropy(x, o, "bucket", **kw),
        ):
            with pytest.raises(TypeError, match="paper_exact must be True or False"):
                fn(x, o, paper_exact=bad)
    h, _ = ef.bucket_entropy_and_cosine(x, o, paper_exact=np.bool_(True))
    assert torch.equal(h, ef.bucket_entropy(x, o, paper_exact=True))
    with pytest.raises(ValueError, match="at least 2"):
        ef.bucket_entropy_and_cosine(x[:, :1], o[:, :1])


def test_nan_in_x_counts_for_both_results():
    """A token with NaN in x only (Y = y finite): it raises by default; ``omit`` drops it from
    the entropy and the cosine alike, as masking it out would."""
    x, o = _pair((2, 12, 16), torch.float32)
    x[1, 4, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 1 token"):
        ef.bucket_entropy_and_cosine(x, y=o)
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        h, c = ef.bucket_entropy_and_cosine(x, y=o, nan_policy="omit")
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 4] = False
    assert torch.equal(h, ef.bucket_entropy(o, mask=keep))
    assert_close(ef.cosine_importance(x, y=o, mask=keep, backend="torch"), c, 1e-6, 1e-8)


# ---------------------------------------------------------------- the profiler's taps


def _profile(name, methods):
    from entrodrop_fast.profile.inmemory import ProfileSettings, profile

    model = tiny_model(name, seed=5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=g)
    settings = ProfileSettings(methods=methods, backend="cpp", batch_size=3)
    return profile(model, ids, settings, progress=False)


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_taps_read_each_block_once_for_bucket_and_cosine(name, monkeypatch):
    """With bucket and cosine asked for, every block's cosine comes from the fused call (no
    separate cosine pass on the attention or layer blocks of a sequential model, none at all
    on a parallel one), and the report equals the one from the separate calls."""
    from entrodrop_fast.ops import api
    from entrodrop_fast.profile import taps

    calls = {"fused": 0, "cosine": 0}
    real_fused, real_cos = api.bucket_entropy_and_cosine, api.cosine_importance

    def fused(*a, **k):
        calls["fused"] += 1
        return real_fused(*a, **k)

    def cos(*a, **k):
        calls["cosine"] += 1
        return real_cos(*a, **k)

    monkeypatch.setattr(api, "bucket_entropy_and_cosine", fused)
    monkeypatch.setattr(api, "cosine_importance", cos)
    got = _profile(name, ("bucket", "cosine"))
    assert calls["fused"] > 0
    sequential = name == "llama"
    # sequential: attn (m_l) and layer (r_{l+1}) fused, the MLP's cosine alone (its Y is
    # r_{l+1}, whose entropy the layer block already took); parallel: all three fused
    assert calls["cosine"] == (calls["fused"] // 2 if sequential else 0), calls

    def separate(self, point, kind, li, x, f=None, y=None):
        self._entropy(point, x, f) if y is None else self._entropy(point, y)
        self._cosine(kind, li, x, f, y)

    monkeypatch.setattr(taps.BlockStatistics, "_entropy_and_cosine", separate)
    want = _profile(name, ("bucket", "cosine"))
    assert got["entropy"] == want["entropy"] and got["delta"] == want["delta"]
    for kind in ("attn", "mlp", "layer"):
        assert got["cosine"][kind]["mean"] == pytest.approx(
            want["cosine"][kind]["mean"], rel=1e-6, abs=1e-9
        ), kind


@pytest.mark.parametrize("D", [2, 63, 576])
def test_importance_near_zero_keeps_the_cosine_kernels_precision(D):
    """1 - mean cos of nearly parallel x and Y magnifies the fp32 sums' rounding (a fresh
    user's test: at D = 63 the fused call was 3.4e-4 off in relative terms, against 3.7e-5
    for cosine_importance, from a sequential fp32 sum of the channels left after the 64-wide
    strips; now summed in fp64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, D, generator=g)
    f = 0.01 * torch.randn(4, 256, D, generator=g)
    _, c = ef.bucket_entropy_and_cosine(x, f)
    exact = R.cosine(x.double(), f.double(), None, True)
    want = 1.0 - exact[0] / exact[1]  # fp64 throughout
    assert float(want.min()) < 1e-3  # the case: importance near 0
    rel = ((c - want) / want).abs().max().item()
    assert rel < 1.5e-4, rel
    assert (c - want).abs().max().item() < 5e-8
