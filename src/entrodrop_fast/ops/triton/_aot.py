"""Compile every kernel ahead of time for a GPU architecture, without a GPU.

A check for machines with no GPU: Triton ships ptxas, so ``compile_all(90)`` proves the
kernels lower to sm_90 machine code (the interpreter alone would not). Run it in a
process *without* TRITON_INTERPRET=1: ``python -m entrodrop_fast.ops.triton._aot 90 80``.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from entrodrop_fast.ops.triton import bucket, bucket_fused, cosine, knn, moments


def _compile(fn, arch: int, ptrs: dict, consts: dict, **opts):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    return triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts),
        target=GPUTarget("cuda", arch, 32),
        options=opts,
    )


def compile_all(arch: int) -> dict:
    """{kernel name: ptx text} for every kernel, compiled for sm_<arch>."""
    bf, u8, f32, f64 = "*bf16", "*u8", "*fp32", "*fp64"
    xin = {"x_ptr": bf, "f_ptr": bf, "m_ptr": u8}
    flags = dict(HAS_F=True, HAS_MASK=True, BLOCK_T=32, BLOCK_D=128)
    pair = flags | dict(PAIR=True)
    nofuse = dict(enable_fp_fusion=False)
    jobs = [
        (
            moments._moments_partial_kernel,
            xin
            | dict.fromkeys(["pn_ptr", "pmin_ptr", "pmax_ptr"], f32)
            | dict.fromkeys(["pmean_ptr", "pm2_ptr"], f64),
            pair | dict(BLOCK_D=64),
            {},
        ),
        (
            moments._moments_merge_kernel,
            dict.fromkeys(["pn_ptr", "pmin_ptr", "pmax_ptr", "min_ptr", "max_ptr"], f32)
            | dict.fromkeys(["pmean_ptr", "pm2_ptr", "count_ptr", "mean_ptr", "m2_ptr"], f64),
            dict(BLOCK_S=16, BLOCK_D=128),
            {},
        ),
        (
            bucket_fused._bucket_fused_kernel,
            xin | {"hy_ptr": f64, "hx_ptr": f64, "wide_ptr": "*i32"},
            pair | dict(PAPER_EXACT=False, NW=5, BLOCK_D=64, BLOCK_BINS=32, WIDE=False, COS=0),
            nofuse,
        ),
        (
            bucket_fused._bucket_fused_kernel,
            xin | {"hy_ptr": f64, "hx_ptr": f64, "wide_ptr": "*i32"},
            flags
            | dict(PAIR=False, PAPER_EXACT=True, NW=8, BLOCK_D=64, BLOCK_BINS=32, WIDE=True, COS=0),
            nofuse,
        ),
        (  # bucket_cosine, partner x itself: Y = x + f (COS=1)
            bucket_fused._bucket_fused_kernel,
            xin | {"hy_ptr": f64, "hx_ptr": f64, "wide_ptr": "*i32", "c_ptr": bf, "part_ptr": f32},
            flags
            | dict(PAIR=False, PAPER_EXACT=False, NW=5, BLOCK_D=64, BLOCK_BINS=32, WIDE=False)
            | dict(COS=1),
            nofuse,
        ),
        (  # bucket_cosine: the cosine's partial sums in pass 1, partner c (COS=2)
            bucket_fused._bucket_fused_kernel,
            xin | {"hy_ptr": f64, "hx_ptr": f64, "wide_ptr": "*i32", "c_ptr": bf, "part_ptr": f32},
            dict(HAS_F=False, HAS_MASK=True, BLOCK_T=32, PAIR=False, PAPER_EXACT=False, NW=5)
            | dict(BLOCK_D=64, BLOCK_BINS=32, WIDE=False, COS=2),
            nofuse,
        ),
        (bucket._minmax_partial_kernel, xin | {"pmin_ptr": f32, "pmax_ptr": f32}, pair, {}),
        (
            bucket._bucket_hist_kernel,
            xin | {"pmin_ptr": f32, "pmax_ptr": f32, "hist_ptr": "*i32"},
            pair | dict(BLOCK_S=16),
            nofuse,
        ),
        (
            bucket._bucket_entropy_kernel,
            {"hist_ptr": "*i32", "pmin_ptr": f32, "out_ptr": f64},
            dict(PAPER_EXACT=True, BLOCK_D=32, BLOCK_BINS=128, BLOCK_S=16),
            {},
        ),
        (
            cosine._cosine_kernel,
            {"x_ptr": bf, "o_ptr": bf, "m_ptr": u8, "cos_ptr": f32},
            dict(FUSED=True, HAS_MASK=True, BLOCK_T=16, BLOCK_D=256),
            {},
        ),
        (
            knn._knn_kernel,
            {"x_ptr": f32, "out_ptr": f64, "scale_ptr": f64},
            dict(BLOCK_M=16, KP=32, BLOCK_D=32),
            {},
        ),
    ]
    out = {}
    for fn, ptrs, consts, opts in jobs:
        name = fn.__name__ + ("_wide" if consts.get("WIDE") else "")
        name += f"_cos{consts['COS']}" if consts.get("COS") else ""
        out[name] = _compile(fn, arch, ptrs, consts, **opts).asm["ptx"]
    return out


if __name__ == "__main__":
    for a in sys.argv[1:] or ["90"]:
        ptx = compile_all(int(a))
        assert "div.rn.f32" in ptx["_bucket_hist_kernel"], "the bin scale must be an IEEE division"
        assert "div.rn.f64" in ptx["_bucket_hist_kernel"], (
            "the fp64 bin scale (wide channels) must be an IEEE division"
        )
        assert (
            "div.rn.f32" in ptx["_bucket_fused_kernel"]
            and "div.rn.f64" in ptx["_bucket_fused_kernel_wide"]
        )
        print(f"sm_{a}: compiled {len(ptx)} kernels: {', '.join(ptx)}")
