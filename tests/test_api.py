"""Public API: shapes, dtypes, DLPack, masks, backend choice and every bad input."""

import numpy as np
import pytest
import torch
from helpers import ESTIMATOR_KW as KW
from helpers import assert_close, llm_like

import entrodrop_fast as ef
from entrodrop_fast.ops import reference as R


@pytest.mark.parametrize("method", ef.METHODS)
def test_batched_equals_per_sample(method):
    x = llm_like(3, 40, 6, seed=1)
    h = ef.entropy(x, method, backend="torch", **KW[method])
    assert h.shape == (3,) and h.dtype == torch.float64
    for b in range(3):
        assert_close(
            ef.entropy(x[b], method, backend="torch", **KW[method]), h[b], 1e-12, name=method
        )


@pytest.mark.parametrize("method", ef.METHODS)
def test_mask_equals_dropping_tokens(method):
    x = llm_like(2, 30, 5, seed=2)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 20:] = False
    mask[1, ::3] = False
    h = ef.entropy(x, method, mask=mask, backend="torch", **KW[method])
    for b in range(2):
        assert_close(
            ef.entropy(x[b][mask[b]], method, backend="torch", **KW[method]),
            h[b],
            1e-12,
            name=method,
        )


@pytest.mark.parametrize("method", ef.METHODS)
def test_fused_f_equals_materialised_y(method):
    x, f = llm_like(2, 25, 4, seed=3), llm_like(2, 25, 4, seed=4)
    assert_close(
        ef.entropy(x + f, method, backend="torch", **KW[method]),
        ef.entropy(x, method, f, backend="torch", **KW[method]),
        1e-6,
        name=method,
    )


def test_numpy_and_dlpack_inputs_give_numpy():
    a = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    h = ef.bucket_entropy(a)
    assert isinstance(h, np.ndarray) and h.shape == ()
    assert h == pytest.approx(ef.bucket_entropy(torch.from_numpy(a)).item())
    h64 = ef.gaussian_diag_entropy(a.astype(np.float64))  # float64 is read as float32
    assert h64 == pytest.approx(ef.gaussian_diag_entropy(torch.from_numpy(a)).item(), rel=1e-12)


def test_strided_input():
    base = llm_like(64, 40, seed=5)
    view = base.t()[::2]  # (20, 64), non-contiguous
    assert_close(ef.bucket_entropy(view.contiguous()), ef.bucket_entropy(view), 0, name="strided")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reads_as_fp32(dtype):
    x = llm_like(100, 8, dtype=dtype)
    assert_close(
        ef.gaussian_diag_entropy(x.float()), ef.gaussian_diag_entropy(x), 0, name=str(dtype)
    )


def test_cosine_and_angular():
    x = torch.randn(2, 10, 6)
    f = torch.randn(2, 10, 6)
    fused = ef.cosine_importance(x, f)
    plain = ef.cosine_importance(x, y=x + f)
    assert_close(plain, fused, 1e-6, name="cosine")
    expect = 1 - torch.nn.functional.cosine_similarity(x.double(), (x + f).double(), dim=-1).mean(
        -1
    )
    assert_close(expect, fused, 1e-6, name="cosine")
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    ang = ef.angular_distance(x, x + f, mask=mask)
    c0 = torch.nn.functional.cosine_similarity(x[0, 6].double(), (x + f)[0, 6].double(), dim=0)
    assert ang[0].item() == pytest.approx(torch.arccos(c0).item() / torch.pi, rel=1e-9)
    assert ef.angular_distance(x, x)[0].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        ef.cosine_importance(x)


def test_delta_entropy():
    x, f = torch.randn(2, 30, 4), torch.randn(2, 30, 4)
    d = ef.delta_entropy(x, f, "gaussian_diag")
    assert_close(ef.gaussian_diag_entropy(x + f) - ef.gaussian_diag_entropy(x), d, 1e-6)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: torch.randn(5), ValueError, "2-D"),
        (lambda: torch.randn(2, 3, 4, 5), ValueError, "2-D"),
        (lambda: torch.randn(0, 4), ValueError, "empty"),
        (lambda: torch.randn(1, 4), ValueError, "at least 2"),
        (lambda: torch.ones(5, 4, dtype=torch.int32), TypeError, "float32"),
        (lambda: torch.ones(5, 4, dtype=torch.complex64), TypeError, "float32"),
        (lambda: [[1.0, 2.0]], TypeError, "DLPack"),
    ],
)
def test_bad_x(make, err, match):
    with pytest.raises(err, match=match):
        ef.bucket_entropy(make())


@pytest.mark.parametrize("method", ef.METHODS)
def test_nan_inf_raise_by_default(method):
    x = torch.randn(20, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ef.entropy(x, method, **KW[method])
    x[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ef.entropy(x, method, **KW[method])
    f = torch.zeros(20, 4)
    f[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ef.entropy(torch.randn(20, 4), method, f, **KW[method])


def test_nan_policy_omit_skips_tokens_and_says_so():
    x = torch.randn(20, 4)
    clean = ef.bucket_entropy(x[1:])
    x[0, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped 1 token"):
        h = ef.bucket_entropy(x, nan_policy="omit")
    assert h.item() == clean.item()
    with pytest.raises(ValueError, match="nan_policy"):
        ef.bucket_entropy(x, nan_policy="zero")


def test_mismatched_f_and_mask():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="shape"):
        ef.bucket_entropy(x, torch.randn(2, 10, 5))
    with pytest.raises(ValueError, match="dtype"):
        ef.bucket_entropy(x, torch.randn(2, 10, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="mask must have shape"):
        ef.bucket_entropy(x, mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        ef.bucket_entropy(x, mask=torch.ones(2, 10))
    m = torch.ones(2, 10, dtype=torch.bool)
    m[1, 1:] = False
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        ef.bucket_entropy(x, mask=m)


def test_knn_needs_more_than_k_tokens():
    with pytest.raises(ValueError, match="at least 6"):
        ef.knn_entropy(torch.randn(5, 3), k=5)
    with pytest.raises(ValueError, match="form"):
        ef.knn_entropy(torch.randn(9, 3), k=2, form="other")


def test_bad_options():
    with pytest.raises(ValueError, match="bins"):
        ef.bucket_entropy(torch.randn(5, 3), bins=0)
    with pytest.raises(ValueError, match="unknown entropy method"):
        ef.entropy(torch.randn(5, 3), "shannon")


def test_constant_channels():
    x = torch.randn(50, 3)
    x[:, 1] = 7.0
    per_channel = R.bucket(x[None], bins=10)[0]
    assert per_channel[1].item() == 0.0
    with pytest.warns(RuntimeWarning, match="floored"):
        h = ef.gaussian_diag_entropy(x)
    assert torch.isfinite(h)
    with pytest.warns(RuntimeWarning, match="singular"):
        assert torch.isfinite(ef.gaussian_full_entropy(x))
    assert ef.gaussian_full_entropy(x, ridge=0.0).item() == float("-inf")


def test_unknown_and_unavailable_backend():
    with pytest.raises(ValueError, match="unknown backend 'metal'.*available here"):
        ef.bucket_entropy(torch.randn(5, 3), backend="metal")
    # "cuda" is a backend (ops/backends.py), whose kernels take CUDA tensors only
    with pytest.raises(
        ValueError, match="backend 'cuda' (is not available|does not run on cpu).*available"
    ):
        ef.bucket_entropy(torch.randn(5, 3), backend="cuda")
    info = ef.backends()
    assert info["torch"]["available"]
    assert set(info) == set(ef.BACKENDS)
    assert ef.resolve_backend("auto", torch.device("cpu")) in ef.BACKENDS


def test_auto_warns_once_when_the_extension_did_not_load(monkeypatch):
    """A checkout on sys.path without the compiled extension (or a failed build): ``auto``
    still works on the torch reference, but says so once, with the reason."""
    import warnings

    from entrodrop_fast.ops import backends, torch_backend

    monkeypatch.setattr(backends, "_loaded", {"torch": torch_backend})
    monkeypatch.setattr(
        backends,
        "_load_errors",
        {
            "cpp": "ImportError: no module named entrodrop_fast._C",
            "triton": "no GPU",
            "cuda": "no GPU",
        },
    )
    monkeypatch.setattr(backends, "_fallback_warned", False)
    x = torch.randn(16, 4)
    with pytest.warns(
        RuntimeWarning,
        match=r"compiled kernels are not available \(ImportError: no module named "
        r"entrodrop_fast._C\).*torch reference",
    ):
        a = ef.bucket_entropy(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ef.bucket_entropy(x)  # once per process
    assert float(a) == float(b) == float(ef.bucket_entropy(x, backend="torch"))


def test_cuda_without_a_gpu_does_not_suggest_rebuilding(monkeypatch):
    # the extension was built with CUDA kernels but no GPU is visible: rebuilding would not help
    from entrodrop_fast.ops import backends

    monkeypatch.setattr(
        backends, "_loaded", {k: v for k, v in backends._loaded.items() if k != "cuda"}
    )
    monkeypatch.setattr(
        backends, "_load_errors", {**backends._load_errors, "cuda": "no CUDA device"}
    )
    with pytest.raises(
        ValueError, match=r"not available \(no CUDA device\); the CUDA kernels need a GPU"
    ) as e:
        backends.resolve_backend("cuda", torch.device("cpu"))
    assert "pip install" not in str(e.value)
