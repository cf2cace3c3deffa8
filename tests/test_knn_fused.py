"""knn for samples of up to 512 valid tokens, the whole batch in one C++ call
(csrc/knn_fused_cpu.cpp, cpp_backend.knn_radii), and the thread pool it runs on
(csrc/threads_cpu.cpp). Radii must agree with the fp64 reference to 1e-9 relative whatever
the dtype, layout, mask, scale or instruction set."""

import math
import os
import subprocess
import sys
import threading

import pytest
import torch
from helpers import DTYPES, assert_close, llm_like, run_child

import entrodrop_fast as ef
from entrodrop_fast import _ext
from entrodrop_fast.ops import cpp_backend as cpp
from entrodrop_fast.ops import reference as ref

RTOL = 1e-9


def same(a, b):
    """Equal bit for bit, NaN (masked tokens) included."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))


def rows_of(x, f, mask, b):
    """Sample b's valid rows of y = x (+ f) in fp32, as the API hands them to the reference."""
    r = x[b].float() if f is None else x[b].float() + f[b].float()
    return r if mask is None else r[mask[b]]


def check_batch(x, f, mask, k, name):
    radii, count, logsum = cpp.knn_radii(x, f, mask, k)
    assert radii.dtype == count.dtype == logsum.dtype == torch.float64
    for b in range(x.shape[0]):
        r = rows_of(x, f, mask, b)
        want = ref.knn_kth_distance(r, k)
        got = radii[b] if mask is None else radii[b][mask[b]]
        assert_close(want, got, RTOL, name=f"{name} sample {b}")
        if mask is not None:
            assert radii[b][~mask[b]].isnan().all(), f"{name}: masked tokens get NaN"
        assert count[b].item() == r.shape[0]
        assert_close(torch.log(want + 1e-10).sum(), logsum[b], 1e-12, name=f"{name} logsum {b}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,k",
    [
        ((1, 2, 3), 1),
        ((1, 31, 5), 30),
        ((1, 257, 577), 25),
        ((2, 100, 64), 7),
        ((5, 64, 40), 25),
        ((9, 48, 33), 3),
    ],
    ids=str,
)
def test_radii_match_reference(dtype, shape, k):
    # B = 1, 2 (each sample's steps in parallel) and 5, 9 (whole samples per thread)
    x = llm_like(*shape, seed=31, dtype=dtype)
    check_batch(x, None, None, k, f"{dtype} {shape} k={k}")


@pytest.mark.parametrize("k", [1, 4, 25, 63, 64, 65, 70, 199])
def test_every_k(k):
    # k <= 64: the insertion network (a multiple of 4 >= k kept); beyond, nth_element per row
    x = llm_like(2, 200, 24, seed=32)
    check_batch(x, None, None, k, f"k={k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_f_mask_and_strides(dtype):
    g = torch.Generator().manual_seed(33)
    x = llm_like(3, 90, 50, seed=34, dtype=dtype)
    f = (0.5 * torch.randn(3, 90, 50, generator=g)).to(dtype)
    mask = torch.rand(3, 90, generator=g) > 0.4
    check_batch(x, f, mask, 5, "f + mask")
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel stride 90
    check_batch(xt, None, mask, 5, "channel-strided")
    check_batch(x[:, ::2], f[:, ::2], None, 5, "token-strided")
    mt = mask.t().contiguous().t()
    check_batch(x, f, mt, 5, "strided mask")
    # the same numbers whatever the layout
    assert same(cpp.knn_radii(xt, None, mask, 5)[0], cpp.knn_radii(x, None, mask, 5)[0])


def test_batch_mixing_small_and_large_samples():
    # 600 valid tokens exceed the fused path's 512: that sample takes the tiled path
    x = llm_like(3, 600, 16, seed=35)
    mask = torch.ones(3, 600, dtype=torch.bool)
    mask[0, 300:] = False
    mask[2, 100:] = False
    check_batch(x, None, mask, 9, "mixed")
    check_batch(x[:, :513], None, None, 9, "513 rows")  # just past the limit
    check_batch(x[:, :512], None, None, 9, "512 rows")  # at it


@pytest.mark.parametrize("scale", [1e19, 1e30, 7e37, 1e-25, 1e-41], ids=lambda s: f"{s:g}")
def test_extreme_scales(scale):
    # squared norms past 2^120 or below 2^-90: the rows are scaled by a power of two
    g = torch.Generator().manual_seed(36)
    x = (torch.randn(2, 60, 8, generator=g).double() * scale).float()
    check_batch(x, None, None, 3, f"scale {scale:g}")


def test_heavy_channel_spanning_fp32():
    # +-3e38 in one channel: y - mu overflows fp32 (caught in fp64, the rows rescaled)
    g = torch.Generator().manual_seed(37)
    x = torch.randn(1, 300, 8, generator=g)
    x[0, :, 1] = torch.where(torch.rand(300, generator=g) > 0.5, 3e38, -3e38)
    d = torch.cdist(x[0].double(), x[0].double(), compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    truth = d.kthvalue(5, dim=1).values
    assert float(truth.max()) < 10
    assert_close(truth, cpp.knn_radii(x, None, None, 5)[0][0], 1e-12, name="spanning fp32")


def test_massive_channels_and_outlier_tokens():
    # an attention-sink-like first token far from the rest, massive channels, D >> N
    x = llm_like(2, 256, 2048, seed=38)
    x[:, 0] *= 300.0
    check_batch(x, None, None, 25, "outliers")


def test_duplicates_and_constant_samples():
    x = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(39))
    x[0, 10:20] = x[0, 0]  # eleven identical rows: their 10 nearest others are at distance 0
    x[1] = x[1, 0]  # every row alike
    radii = cpp.knn_radii(x, None, None, 10)[0]
    assert (radii[0, [0, *range(10, 20)]] == 0).all() and (radii[1] == 0).all()
    check_batch(x, None, None, 10, "duplicates")


def test_entropy_batched_equals_per_sample():
    g = torch.Generator().manual_seed(40)
    x = llm_like(4, 80, 30, seed=41)
    f = 0.3 * torch.randn(4, 80, 30, generator=g)
    mask = torch.rand(4, 80, generator=g) > 0.2
    for form in ("paper", "digamma"):
        got = ef.knn_entropy(x, f, k=6, form=form, mask=mask, backend="cpp")
        want = torch.stack([ref.knn_entropy_1(rows_of(x, f, mask, b), 6, form) for b in range(4)])
        assert_close(want, got, 1e-12, name=form)
        assert_close(
            ef.knn_entropy(x, f, k=6, form=form, mask=mask, backend="torch"), got, 1e-12, name=form
        )


def test_paper_formulation():
    # the paper's code: cdist + topk(k + 1) in fp32, H = D mean ln(r + 1e-10) + ... + ln N - ln k
    x = torch.randn(
        256, 576, generator=torch.Generator().manual_seed(42)
    )  # fp32 cdist cancels on massive channels
    d = torch.cdist(x, x)
    r = d.topk(26, dim=1, largest=False).values[:, -1].double()
    N, D = x.shape
    paper = (
        D * torch.log(r + 1e-10).mean()
        + D / 2 * math.log(math.pi)
        - math.lgamma(D / 2 + 1)
        + math.log(N)
        - math.log(25)
    )
    assert_close(paper, ef.knn_entropy(x, k=25), 1e-6, name="paper")  # fp32 distances there


def test_errors():
    x = torch.randn(2, 10, 4)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 5:] = False
    with pytest.raises(ValueError, match=r"k must be in \[1, N - 1\] = \[1, 4\], got 5"):
        cpp.knn_radii(x, None, mask, 5)
    with pytest.raises(ValueError, match="k must be in"):
        cpp.knn_kth_distance(x[0], 10)


def test_stays_in_bounds_on_nan_and_inf_without_validation():
    x = llm_like(3, 100, 20, seed=43)
    x[0, 3, 5] = float("nan")
    x[1, :, 2] = float("inf")
    x[2, 7] = float("-inf")
    radii, count, _ = cpp.knn_radii(x, None, None, 5)  # meaningless numbers, but no crash
    assert radii.shape == (3, 100) and count.tolist() == [100.0] * 3
    ef.knn_entropy(x, k=5, validate=False)


@pytest.mark.parametrize("isa", ["x86-64-v3", "baseline"])
def test_other_instruction_sets(tmp_path, isa):
    # the AVX2 and baseline copies of the kernels, in a fresh process (ENTRODROP_ISA caps it);
    # 300 channels: the Gram's channel chunks (128) and a partial one; masked samples of
    # ~90 rows: partial micro-tiles and panels
    g = torch.Generator().manual_seed(44)
    x = llm_like(3, 130, 300, seed=45)
    f = 0.2 * torch.randn(3, 130, 300, generator=g)
    mask = torch.rand(3, 130, generator=g) > 0.3
    code = (
        "import sys, torch\n"
        "from entrodrop_fast import _ext\n"
        "from entrodrop_fast.ops import cpp_backend as cpp\n"
        "x, f, mask = torch.load(sys.argv[1])\n"
        "out = [cpp.knn_radii(x, f, mask, k)[0] for k in (1, 25, 70)] + "
        "[cpp.knn_radii(x[:1], None, None, 25)[0]]\n"
        "torch.save((_ext.require().knn_isa_cpu(), out), sys.argv[2])\n"
    )
    used, outs = run_child(code, (x, f, mask), tmp_path, ENTRODROP_ISA=isa)
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert used == isa or (isa == "x86-64-v3" and used == "baseline")  # a CPU without AVX2
    for k, got in zip((1, 25, 70), outs[:3], strict=True):
        for b in range(3):
            assert_close(
                ref.knn_kth_distance(rows_of(x, f, mask, b), k),
                got[b][mask[b]],
                RTOL,
                name=f"{isa} k={k}",
            )
    assert_close(ref.knn_kth_distance(x[0], 25), outs[3][0], RTOL, name=f"{isa} B=1")


# ------------------------------------------------------------------ the thread pool


def test_threads_do_not_change_knn():
    x = llm_like(5, 200, 40, seed=46)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.knn_radii(x, None, None, 7)[0], cpp.knn_radii(x[:1], None, None, 7)[0]
        torch.set_num_threads(2)
        two = cpp.knn_radii(x, None, None, 7)[0], cpp.knn_radii(x[:1], None, None, 7)[0]
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_kernels_called_from_several_python_threads():
    # the kernels release the GIL; concurrent callers share the pool (one job at a time, the
    # others run on their own thread) and get the same numbers as one caller
    x, f = llm_like(4, 256, 64, seed=47), llm_like(4, 256, 64, seed=48)
    calls = [
        lambda: cpp.knn_radii(x, None, None, 9)[0],
        lambda: cpp.bucket(x, f, None, 20, False),
        lambda: cpp.moments(x, f, None)["m2"],
        lambda: cpp.cosine(x, f, None, True)[0],
    ]
    want = [c() for c in calls]
    errors, results = [], {}

    def run(i):
        try:
            for rep in range(20):
                results[(i, rep)] = calls[i % len(calls)]()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (i, _), got in results.items():
        w = want[i % len(calls)]
        if i % len(calls) in (0, 1):
            assert torch.equal(w, got)
        else:  # per-thread partial sums: the order of a sum may differ
            assert_close(w, got, 1e-12, 1e-12, name=f"call {i}")


def _fork_and_check(tmp_path, parent: str, child: str, mode: str = "auto"):
    """Run ``parent`` in a fresh process with ENTRODROP_THREADS=mode (auto: unset), fork, run
    ``child`` (which sets ``ok``) in the child; the process exits 0 when the child's ok and it
    ran on the pool. The extension is loaded only by what ``parent`` runs, or in the child."""
    code = (
        "import os, signal, sys, torch\n"
        "import entrodrop_fast as ef\n"  # loads no extension yet
        "torch.set_num_threads(2)\n" + parent + "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(60)\n"
        "    from entrodrop_fast import _ext\n"
        "    from entrodrop_fast.ops import cpp_backend as cpp\n"
        + "".join(f"    {line}\n" for line in child.splitlines())
        + "    ok = ok and _ext.require().thread_pool_cpu() == 'pool'\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ENTRODROP_THREADS"}
    if mode != "auto":
        env["ENTRODROP_THREADS"] = mode
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, timeout=120, env=env)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("mode", ["auto", "pool"])
def test_kernels_work_in_a_forked_child(tmp_path, mode):
    # a child forked after the kernels ran has none of the parent's threads (its pool's
    # helpers, the OpenMP team's): it runs on a fresh pool of its own
    r = _fork_and_check(
        tmp_path,
        "from entrodrop_fast.ops import cpp_backend as cpp\n"
        "x = torch.randn(6, 200, 48)\nwant = cpp.knn_radii(x, None, None, 5)[0]\n",
        "ok = all(torch.equal(cpp.knn_radii(x, None, None, 5)[0], want) for _ in range(5))",
        mode,
    )
    assert r.returncode == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("first_call", ["child", "parent_small"])
def test_fork_after_a_parallel_torch_op(tmp_path, first_call):
    # the parent ran a parallel torch op (torch's OpenMP team exists) and either no kernel or
    # one too small to go parallel; the extension may even be loaded only in the child. A
    # child on the parent's team would wait forever at its first parallel region (found by a
    # fresh user's test: the child hung in knn_entropy); it must run on the pool.
    parent = "x = torch.randn(4, 256, 256) * 1.0\n"
    if first_call == "parent_small":
        parent += "ef.knn_entropy(torch.randn(1, 30, 16), k=5)\n"
    r = _fork_and_check(
        tmp_path, parent, "ok = torch.isfinite(ef.knn_entropy(x, k=25)).all().item()"
    )
    assert r.returncode == 0, f"child status {r.returncode} (-14 or 142: it hung)"


@pytest.mark.skipif(
    "ENTRODROP_THREADS" in os.environ, reason="thread mode chosen by the environment"
)
def test_default_threads_are_torchs_openmp_team():
    # the default borrows the OpenMP team torch runs (its threads spin after every torch op,
    # on the cores a pool of our own would need), falling back to the pool after a region
    # that stalled; the pool where torch loaded no OpenMP
    pool = _ext.require().thread_pool_cpu()
    if "OpenMP" in torch.__config__.parallel_info():
        assert pool.startswith("openmp team of ") and "the pool after a stalled region" in pool
    else:
        assert pool == "pool"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_massive_token_rows_exact(dtype, seed):
    """One or two massive-activation tokens (|y| ~ 2e4 in a few channels, as SmolLM2's mid
    layers) beside ordinary rows, some of them near-duplicates: every row's band is its own
    (not widened by the massive rows) and the radii stay exact to 1e-9 against fp64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 256, 576, generator=g)
    x[0, 0, :4] = 2.3e4
    x[0, 7, 100:103] = -1.5e4
    x[0, 40:60] = x[0, 20:40] + 1e-3 * torch.randn(20, 576, generator=g)  # near-duplicates
    x[0, 60:64] = x[0, 64:68]  # exact duplicates: zero distances
    x = x.to(dtype)
    from entrodrop_fast.ops import cpp_backend, reference

    r = cpp_backend.knn_kth_distance(x[0], 25)  # the fused kernel (N <= 512)
    torch.testing.assert_close(r, reference.knn_kth_distance(x[0].double(), 25), rtol=1e-9, atol=0)
    # and the estimator (knn_terms: the same kernel, whole batch) against the torch backend
    got = ef.knn_entropy(x, k=25)
    want = ef.knn_entropy(x, k=25, backend="torch")
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-9, atol=1e-9)
