"""CUDA kernels (cuda_backend) and Triton kernels (triton_backend) against the reference, on GPU.

Skipped without a CUDA device. benches/gpu_check.sh runs this on the lent GPU machine.
"""

import importlib.util
import os

import pytest
import torch
from conftest import DTYPES, assert_close, llm_like

from entrodrop_fast.ops import reference as ref_ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = [(1, 2, 1), (1, 3, 5), (1, 257, 577), (3, 33, 65), (2, 100, 4096)]


def _backends():
    out = [pytest.param("cuda", id="cuda")]
    has_triton = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(not has_triton, reason="triton missing (or TRITON_INTERPRET=1)")))
    return out


def backend(name):
    if name == "cuda":
        import entrodrop_fast.ops.cuda_backend as mod
    else:
        import entrodrop_fast.ops.triton_backend as mod
    ok, why = mod.available()
    if not ok:
        pytest.skip(f"{name} backend unavailable: {why}")
    return mod


def counts_fn(name):
    if name == "cuda":
        from entrodrop_fast.ops.cuda_backend import bucket_counts
    else:
        from entrodrop_fast.ops.triton.bucket import bucket_counts
    return bucket_counts


def make(shape, dtype, seed=0, strided=False):
    x = llm_like(*shape, seed=seed, dtype=dtype)
    if strided:  # channel stride 2, samples interleaved between tokens
        B, T, D = shape
        buf = torch.zeros(T, B, 2 * D, dtype=dtype)
        buf[..., ::2] = x.transpose(0, 1)
        x = buf.cuda().transpose(0, 1)[..., ::2]
        return x
    return x.cuda()


def make_mask(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape[:2], generator=g) > 0.4
    m[:, 0] = True
    m[:, -1] = True
    return m.cuda()


def ref_counts(x, f, mask, bins):
    y = ref_ops._y(x, f)
    out = []
    for b in range(y.shape[0]):
        idx = ref_ops.bucket_bin_index(ref_ops._rows(y, mask, b), bins)
        c = torch.zeros(y.shape[2], bins, dtype=torch.int64, device=y.device)
        c.scatter_add_(1, idx.t(), torch.ones_like(idx.t()))
        out.append(c)
    return torch.stack(out)


def check_moments(ref, out, name=""):
    assert out["count"].device.type == "cuda"
    assert_close(ref["count"], out["count"], 0, name=f"{name} count")
    assert_close(ref["m2"], out["m2"], 1e-5, 1e-9, name=f"{name} m2")
    assert_close(ref["min"], out["min"], 0, name=f"{name} min")
    assert_close(ref["max"], out["max"], 0, name=f"{name} max")
    std = (ref["m2"] / ref["count"][:, None]).sqrt().cpu()
    err = (ref["mean"].cpu() - out["mean"].double().cpu()).abs()
    tol = 1e-5 * ref["mean"].abs().cpu() + 1e-6 * std + 1e-30
    assert bool((err <= tol).all()), f"{name} mean: worst excess {(err - tol).max():.3e}"


@pytest.mark.parametrize("name", _backends())
def test_available(name):
    mod = backend(name)
    assert "cuda" in mod.devices()


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments(name, shape, dtype):
    mod = backend(name)
    x, f, m = make(shape, dtype), make(shape, dtype, seed=1), make_mask(shape)
    check_moments(ref_ops.moments(x), mod.moments(x, None, None), "x")
    check_moments(ref_ops.moments(x, f, m), mod.moments(x, f, m), "x+f masked")
    xs = make(shape, dtype, seed=2, strided=True)
    check_moments(ref_ops.moments(xs, None, m), mod.moments(xs, None, m), "strided")


@pytest.mark.parametrize("name", _backends())
def test_moments_offset_channels(name):
    mod = backend(name)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3000, 96, generator=g)
    x[..., 3] = x[..., 3] * 1e4 + 3e5
    x[..., 7] = x[..., 7] * 1e-3 + 10.0
    x = x.cuda()
    check_moments(ref_ops.moments(x), mod.moments(x, None, None), "offset")


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bins", [1, 20, 80])
def test_bucket_counts_exact(name, shape, dtype, bins):
    backend(name)
    counts = counts_fn(name)
    x, f, m = make(shape, dtype), make(shape, dtype, seed=1), make_mask(shape)
    x[..., 0] = 1.5  # a constant channel
    assert torch.equal(counts(x, None, None, bins).long(), ref_counts(x, None, None, bins))
    assert torch.equal(counts(x, f, m, bins).long(), ref_counts(x, f, m, bins))
    xs = make(shape, dtype, seed=2, strided=True)
    assert torch.equal(counts(xs, None, m, bins).long(), ref_counts(xs, None, m, bins))


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("paper_exact", [False, True])
def test_bucket_entropy(name, paper_exact):
    mod = backend(name)
    shape = (3, 301, 130)
    x, f, m = make(shape, torch.bfloat16), make(shape, torch.bfloat16, seed=2), make_mask(shape)
    for args in [(x, None, None), (x, f, m)]:
        assert_close(ref_ops.bucket(*args, 80, paper_exact), mod.bucket(*args, 80, paper_exact), 1e-12, 1e-12)


@pytest.mark.parametrize("name", _backends())
def test_bucket_many_bins(name):
    """More bins than fit the shared-memory counters: the global-memory path."""
    backend(name)
    shape = (1, 700, 70)
    x = make(shape, torch.float16)
    assert torch.equal(counts_fn(name)(x, None, None, 2500).long(), ref_counts(x, None, None, 2500))


def test_triton_cosine_knn():
    mod = backend("triton")
    shape = (3, 65, 300)
    x, o, m = make(shape, torch.bfloat16), make(shape, torch.bfloat16, seed=4), make_mask(shape)
    for fused in (True, False):
        r, t = ref_ops.cosine(x, o, m, fused), mod.cosine(x, o, m, fused)
        assert_close(r[0], t[0], 1e-5, 1e-6)
        assert_close(r[1], t[1], 0)
    xk = llm_like(300, 64, seed=3, outliers=False).cuda()
    assert_close(ref_ops.knn_kth_distance(xk, 25), mod.knn_kth_distance(xk, 25), 1e-5, 1e-6)


def test_stream_ordering():
    """Kernels run on the caller's current stream: results are right when read on that stream."""
    mod = backend("cuda")
    s = torch.cuda.Stream()
    x = make((1, 4096, 512), torch.bfloat16)
    ref = ref_ops.moments(x)
    with torch.cuda.stream(s):
        y = x * 1  # produced on s
        out = mod.moments(y, None, None)
    s.synchronize()
    check_moments(ref, out, "stream")


@pytest.mark.slow
@pytest.mark.parametrize("name", _backends())
def test_big_bf16(name):
    """[32768, 8192] bf16 once: moments to 1e-5 and bucket counts exact (80 bins)."""
    mod = backend(name)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 32768, 8192, generator=g, device="cuda")
    x[..., 1] = x[..., 1] * 50 + 3000.0
    x[..., 4096] *= 400.0
    x = x.to(torch.bfloat16)
    check_moments(ref_ops.moments(x), mod.moments(x, None, None), "big")
    ref = ref_counts(x, None, None, 80)
    assert torch.equal(counts_fn(name)(x, None, None, 80).long(), ref)
    del ref
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,k", [(26, 5, 25), (257, 577, 25), (2048, 64, 25), (700, 4096, 7)])
def test_cuda_knn_tiled(dtype, N, D, k):
    """cuda_backend.knn_kth_distance (tiled cuBLAS GEMMs + exact fp64 band) to 1e-9."""
    mod = backend("cuda")
    x = llm_like(N, D, seed=N, dtype=dtype)
    r = x.double()
    want = torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(float("inf")).kthvalue(k, 1).values
    assert_close(want, mod.knn_kth_distance(x.cuda(), k), 1e-9)
    assert_close(want, mod.knn_kth_distance(x.cuda()[:, :].t().contiguous().t(), k), 1e-9)  # column-major
    dup = x[: N // 4].repeat(4, 1)
    rd = dup.double()
    want = torch.cdist(rd, rd, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(float("inf")).kthvalue(min(k, dup.shape[0] - 1), 1).values
    assert_close(want, mod.knn_kth_distance(dup.cuda(), min(k, dup.shape[0] - 1)), 1e-9)


def test_cuda_knn_tf32_allowed():
    """With TF32 GEMMs allowed the band widens; the radii stay exact."""
    mod = backend("cuda")
    x = llm_like(1000, 1024, seed=3, dtype=torch.bfloat16)
    r = x.double()
    want = torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(float("inf")).kthvalue(25, 1).values
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = mod.knn_kth_distance(x.cuda(), 25)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_close(want, got, 1e-9)
