"""Helpers shared by the backend tests (test_backends.py, the conformance suite, and the
backend-specific test_cpp_backend.py, test_triton_backend.py, test_cuda_backend.py): the
backends to run, inputs (LLM-like, strided, masked, with NaN/Inf), reference bin counts and
the comparisons with the torch reference, with each backend's tolerances."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_close, llm_like

from entrodrop_fast.ops import backends as B
from entrodrop_fast.ops import reference as ref_ops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Tol:
    """How close a backend's results must be to the reference's (its fp32 arithmetic)."""

    mean_rel: float  # |mean - ref| <= mean_rel |ref| + mean_std * std + 1e-30
    mean_std: float
    m2: tuple[float, float]  # (rtol, atol)
    cosine: tuple[float, float, bool]  # (rtol, atol, atol per valid token)
    knn: tuple[float, float]
    f64_moments: bool  # mean/m2 float64, min/max float32 (GPU backends may return float32)


# cpp: fp32 sums of fp32 values (fp64 merges); triton / cuda: fp32 chunks, fp64 merges; torch:
# the reference itself (bit for bit)
TOLS = {
    "torch": Tol(0.0, 0.0, (0.0, 0.0), (0.0, 0.0, False), (0.0, 0.0), True),
    "cpp": Tol(1e-6, 1e-6, (1e-5, 1e-30), (1e-6, 1e-6, True), (1e-5, 0.0), True),
    "triton": Tol(1e-5, 1e-6, (1e-5, 1e-9), (1e-5, 1e-6, False), (1e-5, 1e-6), False),
    "cuda": Tol(1e-5, 1e-6, (1e-5, 1e-9), (1e-5, 1e-6, False), (1e-5, 1e-6), False),
}


@dataclass(frozen=True)
class Backend:
    """One backend on one device, its ops as ops/backends.py routes them."""

    name: str
    dev: str

    def op(self, op: str):
        return B.kernel(self.name, self.dev, op)

    @property
    def mod(self):
        return B._import(self.name)

    @property
    def tol(self) -> Tol:
        return TOLS[self.name]

    @property
    def interpreted(self) -> bool:  # Triton's interpreter: slow, small cases only
        return self.name == "triton" and self.dev == "cpu"

    def counts(self):
        """The backend's own bin-count function (bucket_counts) or None."""
        if self.name == "cuda":
            return self.mod.bucket_counts
        if self.name == "triton":
            from entrodrop_fast.ops.triton.bucket import bucket_counts

            return bucket_counts
        return None


def backend_params():
    """Every backend and device this suite knows, skipped where unavailable (cpp never skips:
    CI builds the extension, and a missing build must fail)."""
    triton_dev = "cpu" if INTERPRET else "cuda"
    no_triton = not HAS_TRITON or (triton_dev == "cuda" and not HAS_CUDA)
    return [
        pytest.param(Backend("torch", "cpu"), id="torch-cpu"),
        pytest.param(Backend("cpp", "cpu"), id="cpp-cpu"),
        pytest.param(Backend("triton", triton_dev), id=f"triton-{triton_dev}",
                     marks=[pytest.mark.triton, pytest.mark.skipif(no_triton, reason="triton missing (or TRITON_INTERPRET=0 without a GPU)")]),
        pytest.param(Backend("cuda", "cuda"), id="cuda-cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
        pytest.param(Backend("torch", "cuda"), id="torch-cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
    ]


def require(be: Backend) -> Backend:
    """The backend, available (cpp: asserted; the others: skipped when not)."""
    mod = B._module(be.name)
    if be.name == "cpp":
        assert mod is not None, B._load_errors.get("cpp")
    elif mod is None or be.dev not in mod.devices():
        pytest.skip(f"{be.name} backend unavailable on {be.dev}: {B._load_errors.get(be.name, 'no such device')}")
    return be


# ------------------------------------------------------------------ inputs


def make(shape, dtype, dev, seed=0, strided=False):
    """LLM-like [B, T, D] on dev; strided: channel stride 2, samples interleaved between tokens
    (strides (2D, 2BD, 2)), built on dev (``.to`` would copy it contiguous)."""
    x = llm_like(*shape, seed=seed, dtype=dtype).to(dev)
    if strided:
        Bn, T, D = shape
        buf = torch.zeros(T, Bn, 2 * D, dtype=dtype, device=dev)
        buf[..., ::2] = x.transpose(0, 1)
        x = buf.transpose(0, 1)[..., ::2]
    return x


def make_mask(shape, dev, seed=0):
    """[B, T] bool, first and last token of each sample valid."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape[:2], generator=g) > 0.4
    m[:, 0] = True
    m[:, -1] = True
    return m.to(dev)


def data(shape, dtype, seed=0):
    """x, f, mask on CPU (randn; at least two valid tokens per sample), as test_cpp_backend's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    f = (0.5 * torch.randn(*shape, generator=g)).to(dtype)
    mask = torch.rand(shape[:2], generator=g) > 0.3
    mask[:, :2] = True
    return x, f, mask


def strided_views(dtype, dev="cpu"):
    """Non-contiguous x, f of four kinds (views of tensors on dev)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 150, 97, generator=g).to(dtype).to(dev)
    fb = torch.randn(2, 150, 97, generator=g).to(dtype).to(dev)
    return {
        "transposed": (base.transpose(1, 2)[:, :, :80], fb.transpose(1, 2)[:, :, :80]),  # channel stride 150
        "sliced": (base[:, ::2, 1::3], fb[:, 1::2, 1::3]),
        "batch-permuted": (base[:, :60].reshape(6, 20, 97).transpose(0, 1), fb[:, :60].reshape(6, 20, 97).transpose(0, 1)),  # [20, 6, 97]
        "expanded": (base[:1, :5].expand(3, 5, 97), fb[:1, :1].expand(3, 5, 97)),  # strides 0
    }


def ref_counts(x, f, mask, bins):
    """Reference bin counts int64 [B, D, bins]."""
    y = ref_ops._y(x, f)
    out = []
    for b in range(y.shape[0]):
        idx = ref_ops.bucket_bin_index(ref_ops._rows(y, mask, b), bins)  # (N, D)
        c = torch.zeros(y.shape[2], bins, dtype=torch.int64, device=y.device)
        c.scatter_add_(1, idx.t(), torch.ones_like(idx.t()))
        out.append(c)
    return torch.stack(out)


BAD_CASES = ["clean", "nan_x", "inf_x", "nan_f", "inf_f", "inf_both", "overflow", "masked"]


def bad_data(dtype, case, shape, dev):
    """x, f, mask [B, T, D] on dev with the bad values of ``case``; the mask leaves token
    (b1, 9) out (b1 = 1, or 0 for one sample)."""
    Bn, T, D = shape
    b1 = min(1, Bn - 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    f = 0.5 * torch.randn(shape, generator=g)
    mask = torch.ones(Bn, T, dtype=torch.bool)
    mask[b1, 9] = False
    big = 3e38 if dtype != torch.float16 else 6e4
    if case == "nan_x":
        x[b1, 5, 7] = NAN
    elif case == "inf_x":
        x[0, 0, 0] = INF
        x[Bn - 1, T - 1, D - 1] = -INF
    elif case == "nan_f":
        f[b1, 5, 7] = NAN
    elif case == "inf_f":
        f[Bn - 1, 3, 4] = -INF
    elif case == "inf_both":  # Inf - Inf = NaN in Y only
        x[0, 4, 2] = INF
        f[0, 4, 2] = -INF
    elif case == "overflow":  # finite x and f; Y overflows fp32 (fp16: only fp16's range, no overflow)
        x[b1, 3, 2] = big
        f[b1, 3, 2] = big
    elif case == "masked":  # bad values only in the masked-out token
        x[b1, 9, 3] = NAN
        f[b1, 9, 4] = INF
        x[b1, 9, 5] = big
        f[b1, 9, 5] = big
    return x.to(dtype).to(dev), f.to(dtype).to(dev), mask.to(dev)


def bad_channels(y, mask):
    """bool [B, D]: (sample, channel) holding a non-finite y among the valid tokens."""
    bad = ~torch.isfinite(y)
    if mask is not None:
        bad &= mask[..., None]
    return bad.any(1)


def same_bits(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(7.0, 8.0, 9.0), b.nan_to_num(7.0, 8.0, 9.0))


# ------------------------------------------------------------------ comparisons


def check_moments(ref, out, tol: Tol, name=""):
    """A backend's moments against the reference's: count, min and max exact."""
    assert set(out) >= {"count", "mean", "m2", "min", "max"}
    if tol.f64_moments:
        assert out["mean"].dtype == torch.float64 and out["m2"].dtype == torch.float64, name
        assert out["min"].dtype == torch.float32 and out["max"].dtype == torch.float32, name
    assert_close(ref["count"], out["count"], 0, name=f"{name} count")
    assert_close(ref["min"], out["min"], 0, name=f"{name} min")
    assert_close(ref["max"], out["max"], 0, name=f"{name} max")
    assert_close(ref["m2"], out["m2"], *tol.m2, name=f"{name} m2")
    # the mean agrees to mean_rel relative, or to mean_std of the channel's spread near 0
    std = (ref["m2"] / ref["count"][:, None]).sqrt().cpu()
    err = (ref["mean"].cpu() - out["mean"].double().cpu()).abs()
    lim = tol.mean_rel * ref["mean"].abs().cpu() + tol.mean_std * std + 1e-30
    assert bool((err <= lim).all()), f"{name} mean: worst excess {(err - lim).max():.3e}"


def check_bucket(be: Backend, x, f=None, mask=None, bins=20, paper_exact=False, name=""):
    r = ref_ops.bucket(x, f, mask, bins, paper_exact)
    c = be.op("bucket")(x, f, mask, bins, paper_exact)
    assert c.dtype == torch.float64
    assert_close(r, c, rtol=1e-12, atol=1e-12, name=f"{name} bucket")


def check_cosine(be: Backend, x, other, mask=None, fused=True, name=""):
    rs, rc = ref_ops.cosine(x, other, mask, fused)
    cs, cc = be.op("cosine")(x, other, mask, fused)
    assert_close(rc, cc, 0, name=f"{name} count")
    # a sum of cosines can cancel: cpp allows atol per valid token (the mean cosine to atol)
    rtol, atol, per_token = be.tol.cosine
    assert_close(rs, cs, rtol=rtol, atol=atol * float(rc.max()) if per_token else atol, name=f"{name} cosine")
