"""Robust bucket variants (ops/robust.py): kernel path vs the readable torch reference."""

import importlib.util
import os

import pytest
import torch
from helpers import DTYPES, llm_like, small_llama

from entrodrop_fast import bucket_entropy
from entrodrop_fast.ops import robust as R

BACKENDS = ["cpp", "torch"]
SHAPES = [(1, 3, 5), (2, 257, 33), (3, 17, 577)]
CASES = [
    ("bucket_q", R.bucket_q_entropy, R.reference_bucket_q, {"q": 0.05}),
    ("bucket_nosink", R.bucket_nosink_entropy, R.reference_bucket_nosink, {"sink": 1}),
    ("bucket_tokennorm", R.bucket_tokennorm_entropy, R.reference_bucket_tokennorm, {}),
]
IDS = [c[0] for c in CASES]


def _close(ref, got):
    # counts are bit-identical (same fp32 bin formula); only the fp64 sum over channels may reorder
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64),
        torch.as_tensor(ref, dtype=torch.float64),
        rtol=1e-12,
        atol=1e-9,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_variant_matches_reference(case, shape, backend):
    _, fast, ref, opts = case
    x = llm_like(*shape, seed=sum(shape))
    _close(ref(x, bins=20, **opts), fast(x, bins=20, backend=backend, **opts))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_variant_dtypes_with_f_and_mask(case, dtype):
    _, fast, ref, opts = case
    x = llm_like(2, 41, 19, seed=3, dtype=dtype)
    f = llm_like(2, 41, 19, seed=4, dtype=dtype, outliers=False)
    mask = torch.rand(2, 41, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, :3] = True
    _close(
        ref(x, f, bins=7, mask=mask, **opts), fast(x, f, bins=7, mask=mask, backend="cpp", **opts)
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_variant_strided_and_2d(case):
    _, fast, ref, opts = case
    base = llm_like(40, 2 * 23, seed=5)
    x = base[:, ::2]  # (40, 23), non-contiguous
    _close(ref(x, bins=11, **opts), fast(x, bins=11, backend="cpp", **opts))
    assert fast(x, bins=11, **opts).dim() == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_variant_nan_raises_or_is_omitted(case):
    _, fast, ref, opts = case
    x = llm_like(1, 30, 8, seed=6)
    x[0, 7, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fast(x, **opts)
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        got = fast(x, nan_policy="omit", **opts)
    keep = torch.ones(1, 30, dtype=torch.bool)
    keep[0, 7] = False
    _close(ref(x, mask=keep, **opts), got)
    f = torch.zeros_like(x)
    x2 = llm_like(1, 30, 8, seed=6)
    f[0, 3, 1] = float("inf")
    with pytest.raises(ValueError):
        fast(x2, f, **opts)


def test_q_zero_is_the_paper_bucket_and_clamps_massive_tokens():
    x = llm_like(2, 64, 16, seed=7)
    torch.testing.assert_close(R.bucket_q_entropy(x, q=0.0), bucket_entropy(x), rtol=0, atol=0)
    # one massive token per channel squeezes every other token into bin 0 for the paper's bucket
    y = torch.randn(1, 200, 4, generator=torch.Generator().manual_seed(0))
    y[0, 0] = 1e4
    assert float(bucket_entropy(y)) < 0.2
    assert float(R.bucket_q_entropy(y, q=0.01)) > 4 * 2.0  # ~ln 20 per channel once clamped


def test_nosink_equals_bucket_without_the_first_token():
    x = llm_like(3, 50, 12, seed=8)
    torch.testing.assert_close(
        R.bucket_nosink_entropy(x, sink=2), bucket_entropy(x[:, 2:]), rtol=1e-12, atol=0
    )


def test_tokennorm_is_scale_invariant_per_token():
    x = llm_like(1, 60, 10, seed=9)
    scale = torch.logspace(-3, 3, 60).view(1, 60, 1)  # powers-of-ten factors per token
    a = R.bucket_tokennorm_entropy(x)
    b = R.bucket_tokennorm_entropy(x * scale)
    assert abs(float(a) - float(b)) < 0.05 * abs(float(a))


def test_bad_options_are_clear():
    x = llm_like(20, 4, seed=1)
    with pytest.raises(ValueError, match="q must lie"):
        R.bucket_q_entropy(x, q=0.5)
    with pytest.raises(ValueError, match="sink"):
        R.bucket_nosink_entropy(x, sink=19)
    with pytest.raises(ValueError, match="bins"):
        R.bucket_tokennorm_entropy(x, bins=0)
    with pytest.raises(TypeError):
        R.bucket_q_entropy(x.to(torch.int32))


def test_variants_profile_through_the_hooks():
    from entrodrop_fast.profile.inmemory import ProfileSettings, profile

    model = small_llama()
    windows = torch.randint(1, 64, (3, 24), generator=torch.Generator().manual_seed(0))
    res = profile(
        model,
        windows,
        ProfileSettings(methods=tuple(R.ROBUST_METHODS), batch_size=2, bins=9),
        progress=False,
    )
    # H at r0 (embeddings) by the hooks = the estimator on the embeddings themselves
    emb = model.get_input_embeddings()(windows).detach()
    for m, fn in R.ROBUST_ESTIMATORS.items():
        want = fn(emb, bins=9).mean()
        assert res["entropy"][m]["mean"][res["points"].index("r0")] == pytest.approx(
            float(want), rel=1e-12
        )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_variant_through_entropy_and_delta_entropy(case):
    # the generic entry points dispatch the variants' names (issue 14: ef.entropy("bucket_q")
    # raised)
    import entrodrop_fast as ef

    name, fast, _, opts = case
    x, f = llm_like(2, 40, 24, seed=3), llm_like(2, 40, 24, seed=4)
    assert name in ef.ROBUST_METHODS and getattr(ef, f"{name}_entropy") is fast
    torch.testing.assert_close(ef.entropy(x, name, **opts), fast(x, **opts), rtol=0, atol=0)
    torch.testing.assert_close(
        ef.delta_entropy(x, f, name, **opts), fast(x, f, **opts) - fast(x, **opts), rtol=0, atol=0
    )


def test_unknown_method_lists_the_variants():
    import entrodrop_fast as ef

    with pytest.raises(
        ValueError,
        match="unknown entropy method 'bucket_z'.*bucket_q, bucket_nosink, bucket_tokennorm",
    ):
        ef.entropy(torch.zeros(4, 3), "bucket_z")


@pytest.mark.triton
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_variant_on_triton_matches_reference(case):
    # the variants call the fused bucket kernel of whichever backend is chosen; under
    # TRITON_INTERPRET=1 (conftest) the Triton kernels run on CPU tensors, on a GPU on CUDA ones
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not interpret and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device")
    dev = "cpu" if interpret else "cuda"
    _, fast, ref, opts = case
    x = llm_like(2, 33, 65, seed=5)
    m = torch.rand(2, 33, generator=torch.Generator().manual_seed(1)) > 0.3
    m[:, :2] = True
    _close(
        ref(x, bins=20, mask=m, **opts),
        fast(x.to(dev), bins=20, mask=m.to(dev), backend="triton", **opts).cpu(),
    )
