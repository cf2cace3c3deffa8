"""The CPU kernels are compiled once per x86-64 level (AVX-512, AVX2, the SSE2 baseline) and one
copy runs per process (csrc/common_cpu.h, isa_level; ENTRODROP_ISA caps it). Every copy must
give the same histograms bit for bit and the same moments and cosines to fp32 rounding, on odd
widths (tails of the vector strips), long samples (the streamed tile), masks, strided views,
every dtype and NaN / Inf. Each copy runs in a fresh process."""

import os
import sys

import pytest
import torch
from helpers import llm_like, run_child

from entrodrop_fast import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the compiled extension is not built")

CHILD = (
    "import sys, torch\n"
    "from entrodrop_fast import _ext\n"
    "from entrodrop_fast.ops import cpp_backend as cpp\n"
    "cases = torch.load(sys.argv[1])\n"
    "out = []\n"
    "for x, f, mask in cases:\n"
    "    for bins in (1, 7, 20, 32, 80):\n"
    "        out.append(cpp.bucket(x, None, mask, bins, False))\n"
    "    out.append(cpp.bucket(x, f, mask, 20, False))\n"
    "    out += list(cpp.bucket_pair(x, f, mask, 20, False))\n"
    "    out += list(cpp.bucket_cosine(x, f, None, mask, 20, False))\n"
    "    m = cpp.moments(x, f, mask)\n"
    "    out += [m['min'], m['max'], m['mean'], m['m2']]\n"
    "    out.append(cpp.cosine(x, f, mask, True)[0])\n"
    "torch.save((_ext.require().knn_isa_cpu(), out), sys.argv[2])\n"
)


def cases():
    g = torch.Generator().manual_seed(11)
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, T, D in ((2, 130, 200), (1, 2300, 72), (3, 40, 13)):
            x = llm_like(B, T, D, seed=D, dtype=dtype)
            f = (0.3 * torch.randn(B, T, D, generator=g)).to(dtype)
            mask = torch.rand(B, T, generator=g) > 0.25
            out.append((x, f, None))
            out.append((x, f, mask))
        # strided views (channel stride 2), a NaN, an Inf, a constant channel
        x = llm_like(2, 90, 2 * 96, seed=5, dtype=dtype)[:, :, ::2]
        f = (0.3 * torch.randn(2, 90, 2 * 96, generator=g)).to(dtype)[:, :, ::2]
        x = x.clone()
        x[0, 3, 5] = float("nan")
        x[1, 7, 40] = float("inf")
        x[:, :, 17] = 1.5
        out.append((x[:, :, :96], f, None))
    return out


def same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.fixture(scope="module")
def default_copy(tmp_path_factory):
    d = tmp_path_factory.mktemp("default")
    return run_child(CHILD, cases(), d)


@pytest.mark.parametrize("isa", ["x86-64-v3", "baseline"])
def test_every_copy_agrees(tmp_path, default_copy, isa):
    used, got = run_child(CHILD, cases(), tmp_path, ENTRODROP_ISA=isa)
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert used == isa or (isa == "x86-64-v3" and used == "baseline")  # a CPU without AVX2
    _, want = default_copy
    assert len(got) == len(want)
    # per case: bucket at 5 bin counts, of x + f, the pair (2), bucket_cosine (H, cosine sum,
    # count), min, max, mean, m2, the cosine sum
    per_case = len(got) // len(cases())
    rounded = {9, 13, 14, 15}  # fp32 sums whose order follows the vector width
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        k = i % per_case
        where = f"output {i} (case {i // per_case}, item {k}) under {isa}"
        if k in rounded:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=where)
        else:
            assert same(a, b), where + " differs"
