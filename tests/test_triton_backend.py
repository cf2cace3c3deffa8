"""Triton backend against the torch reference, under TRITON_INTERPRET=1 on CPU.

On a GPU machine run with TRITON_INTERPRET=0 to test the compiled kernels on CUDA
tensors instead (benches/gpu_check.sh does). Small odd shapes: the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import DTYPES, assert_close, llm_like  # noqa: E402

from entrodrop_fast.ops import reference as ref_ops  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"),
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytestmark.append(pytest.mark.skip(reason="TRITON_INTERPRET=0 and no CUDA device"))
DEV = "cpu" if INTERPRET else "cuda"

SHAPES = [(1, 2, 1), (1, 3, 5), (1, 33, 65), (3, 17, 9)]
SMALL = dict(block_t=16, block_d=32, splits=3)  # several splits and channel blocks on tiny shapes


def tri():
    import entrodrop_fast.ops.triton_backend as tb

    return tb


def make(shape, dtype, seed=0, strided=False):
    x = llm_like(*shape, seed=seed, dtype=dtype).to(DEV)
    if strided:  # channel stride 2, samples interleaved between tokens: strides (2D, 2BD, 2)
        B, T, D = shape
        buf = torch.zeros(T, B, 2 * D, dtype=dtype, device=DEV)  # built on DEV: .to() would copy it contiguous
        buf[..., ::2] = x.transpose(0, 1)
        x = buf.transpose(0, 1)[..., ::2]
    return x


def make_mask(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape[:2], generator=g) > 0.4
    m[:, 0] = True
    m[:, -1] = True
    return m.to(DEV)


def ref_counts(x, f, mask, bins):
    y = ref_ops._y(x, f)
    out = []
    for b in range(y.shape[0]):
        idx = ref_ops.bucket_bin_index(ref_ops._rows(y, mask, b), bins)  # (N, D)
        c = torch.zeros(y.shape[2], bins, dtype=torch.int64, device=y.device)
        c.scatter_add_(1, idx.t(), torch.ones_like(idx.t()))
        out.append(c)
    return torch.stack(out)  # (B, D, bins)


def check_moments(ref, out, name=""):
    assert set(out) >= {"count", "mean", "m2", "min", "max"}
    assert_close(ref["count"], out["count"], 0, name=f"{name} count")
    assert_close(ref["m2"], out["m2"], 1e-5, 1e-9, name=f"{name} m2")
    assert_close(ref["min"], out["min"], 0, name=f"{name} min")
    assert_close(ref["max"], out["max"], 0, name=f"{name} max")
    # the mean agrees to 1e-5 relative, or to 1e-6 of the channel's spread when it is near 0
    std = (ref["m2"] / ref["count"][:, None]).sqrt().cpu()
    err = (ref["mean"].cpu() - out["mean"].double().cpu()).abs()
    tol = 1e-5 * ref["mean"].abs().cpu() + 1e-6 * std + 1e-30
    assert bool((err <= tol).all()), f"{name} mean: worst excess {(err - tol).max():.3e}"


def test_available_and_devices():
    ok, why = tri().available()
    assert ok, why
    assert "cuda" in tri().devices()
    if INTERPRET:
        assert "cpu" in tri().devices()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments(shape, dtype, nan_empty):
    from entrodrop_fast.ops.triton.moments import moments

    x, f, m = make(shape, dtype), make(shape, dtype, seed=1), make_mask(shape)
    check_moments(ref_ops.moments(x), moments(x, **SMALL), "x")
    check_moments(ref_ops.moments(x, f, m), moments(x, f, m, **SMALL), "x+f masked")


def test_moments_backend_defaults_strided(nan_empty):
    shape = (2, 37, 70)
    x, f, m = make(shape, torch.float32, strided=True), make(shape, torch.bfloat16, seed=3), make_mask(shape, 1)
    assert x.stride(-1) != 1
    check_moments(ref_ops.moments(x), tri().moments(x, None, None), "strided")
    check_moments(ref_ops.moments(x, f.float(), m), tri().moments(x, f.float(), m[:, :]), "strided x+f masked")
    mm = torch.ones(2, 2 * shape[1], dtype=torch.bool, device=DEV)[:, ::2]  # mask with t stride 2
    mm[0, 5] = False
    check_moments(ref_ops.moments(x, None, mm), tri().moments(x, None, mm), "strided mask")


def test_moments_large_offset_channels():
    """Channels 1e4x larger than the rest, with a large mean: the fp32 kernel keeps 1e-5."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 300, 24, generator=g)
    x[..., 3] = x[..., 3] * 1e4 + 3e5
    x[..., 7] = x[..., 7] * 1e-3 + 10.0
    x = x.to(DEV)
    from entrodrop_fast.ops.triton.moments import moments

    check_moments(ref_ops.moments(x), moments(x, block_t=16, block_d=16, splits=4), "offset")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bins", [1, 7, 80])
def test_bucket_counts_exact(shape, dtype, bins):
    from entrodrop_fast.ops.triton.bucket import bucket_counts

    x, f, m = make(shape, dtype), make(shape, dtype, seed=1), make_mask(shape)
    x[..., 0] = 1.5  # a constant channel: everything in bin 0
    assert torch.equal(bucket_counts(x, None, None, bins, **SMALL).long().cpu(), ref_counts(x, None, None, bins).cpu())
    assert torch.equal(bucket_counts(x, f, m, bins, **SMALL).long().cpu(), ref_counts(x, f, m, bins).cpu())


@pytest.mark.parametrize("paper_exact", [False, True])
def test_bucket_entropy(paper_exact, nan_empty):
    shape = (2, 41, 19)
    x, f, m = make(shape, torch.bfloat16), make(shape, torch.bfloat16, seed=2), make_mask(shape)
    x[0, 7, 3] = x[0, :, 3].max()  # ties at the max go to the last bin
    for args in [(x, None, None), (x, f, m)]:
        assert_close(ref_ops.bucket(*args, 20, paper_exact), tri().bucket(*args, 20, paper_exact), 1e-12, 1e-12, name="bucket")


def test_bucket_strided_and_edges(nan_empty):
    shape = (2, 29, 33)
    x = make(shape, torch.float16, strided=True)
    x[1, :, 4] = 0.0
    x[1, 3, 4] = 1.0  # one value at the max, the rest at the min
    mm = torch.ones(2, 2 * shape[1], dtype=torch.bool, device=DEV)[:, ::2]
    mm[1, 10:] = False
    assert_close(ref_ops.bucket(x, None, mm, 80, False), tri().bucket(x, None, mm, 80, False), 1e-12, 1e-12)
    from entrodrop_fast.ops.triton.bucket import bucket_counts

    assert torch.equal(bucket_counts(x, None, mm, 80, **SMALL).long().cpu(), ref_counts(x, None, mm, 80).cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False])
def test_cosine(dtype, fused, nan_empty):
    shape = (3, 21, 70)
    x, o, m = make(shape, dtype), make(shape, dtype, seed=4), make_mask(shape)
    for mask in (None, m):
        r, t = ref_ops.cosine(x, o, mask, fused), tri().cosine(x, o, mask, fused)
        assert_close(r[0], t[0], 1e-5, 1e-6, name="cos sum")
        assert_close(r[1], t[1], 0, name="count")
    xs = make(shape, dtype, strided=True)
    assert_close(ref_ops.cosine(xs, o, None, fused)[0], tri().cosine(xs, o, None, fused)[0], 1e-5, 1e-6, name="strided")


@pytest.mark.parametrize("n,d,k", [(2, 1, 1), (3, 5, 2), (37, 19, 5), (50, 12, 25)])
def test_knn_kth_distance(n, d, k, nan_empty):
    x = llm_like(n, d, seed=n, outliers=False).to(DEV)
    x[min(4, n - 1)] = x[0]  # a duplicate row: distance 0 to an *other* row counts
    assert_close(ref_ops.knn_kth_distance(x, k), tri().knn_kth_distance(x, k), 1e-5, 1e-6, name="knn")
    xt = x.t().contiguous().t()  # column-major
    assert_close(ref_ops.knn_kth_distance(xt, k), tri().knn_kth_distance(xt, k), 1e-5, 1e-6, name="knn strided")


def test_knn_half():
    x = llm_like(33, 16, seed=9, outliers=False, dtype=torch.bfloat16).to(DEV)
    assert_close(ref_ops.knn_kth_distance(x.float(), 3), tri().knn_kth_distance(x, 3), 1e-5, 1e-6)


@pytest.mark.skipif(not INTERPRET, reason="compile-only check for machines without a GPU")
def test_kernels_compile_for_gpu():
    """Every kernel compiles to sm_90 and sm_80 machine code here, without a GPU.

    In a fresh process without TRITON_INTERPRET (the interpreter patches triton.language).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-m", "entrodrop_fast.ops.triton._aot", "90", "80"], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode and ("ptxas" in r.stderr or "ImportError" in r.stderr):
        pytest.skip(f"cannot compile for a GPU here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sm_90: compiled 7 kernels" in r.stdout
