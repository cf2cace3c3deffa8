"""Static check of the hot Triton kernels for sm_90, on a machine without a GPU.

    python benches/triton_static.py            # (without TRITON_INTERPRET)

Compiles the fused bucket kernel and the moments kernel with the specializations a real
launch gets (unit channel stride, 16-byte aligned pointers and strides, bf16 x and f),
assembles them with Triton's own ptxas and prints, per kernel and block configuration:
registers per thread, spill bytes, 16-byte loads, and the SASS instructions of each loop
(a backward branch), per element of the tile a thread holds. With H200's issue rate
(132 SMs x 4 warp instructions per clock x 1.98 GHz) this bounds the throughput the
kernel can reach; the bandwidth itself needs the GPU (benches/bench_gpu.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET (the interpreter patches triton.language)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from entrodrop_fast.ops.triton import bucket_fused, moments  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ISSUE = 132 * 4 * 32 * 1.98e9  # thread instructions per second, H200
XIN = {"x_ptr": "*bf16", "f_ptr": "*bf16", "m_ptr": "*u8"}
ALIGNED = ["x_ptr", "f_ptr", "sxb", "sxt", "sfb", "sft", "D", "T"]


def sass_report(fn, ptrs: dict, consts: dict, num_warps: int, **opts) -> dict:
    consts = dict(consts, sxd=1, sfd=1)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    attrs = {
        (fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in fn.arg_names
    }
    k = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(opts, num_warps=num_warps),
    )
    ptxas = next((p for p in (BIN / "ptxas-blackwell", BIN / "ptxas") if p.exists()), None)
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(k.asm["ptx"])
        r = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(cubin)],
            capture_output=True,
            text=True,
        )
        sass = subprocess.run(
            [str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True
        ).stdout
    loops = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/[^\n]*?BRA (?:!?P\d, )?0x([0-9a-f]+)", sass):
        at, to = int(m.group(1), 16), int(m.group(2), 16)
        if to < at:
            loops.append((at - to) // 16 + 1)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spill = re.findall(r"(\d+) bytes spill stores", r.stderr)
    return {
        "regs": int(regs[0]) if regs else None,
        "spill": int(spill[0]) if spill else None,
        "ld128": k.asm["ptx"].count("ld.global.v4"),
        "loops": loops,
    }


def main() -> None:
    hy = {"hy_ptr": "*fp64", "hx_ptr": "*fp64", "wide_ptr": "*i32"}
    mom = dict.fromkeys(["pn_ptr", "pmin_ptr", "pmax_ptr"], "*fp32") | dict.fromkeys(
        ["pmean_ptr", "pm2_ptr"], "*fp64"
    )

    def fused(pair: bool, block_t: int) -> dict:
        """The single-read bucket kernel's constants: x alone, or the pair (x, y = x + f)."""
        return dict(
            HAS_F=pair,
            HAS_MASK=False,
            PAIR=pair,
            PAPER_EXACT=False,
            NW=5,
            BLOCK_T=block_t,
            BLOCK_D=64,
            BLOCK_BINS=32,
            WIDE=False,
        )

    def partial(pair: bool) -> dict:
        """The moments kernel's constants: x alone, or the pair."""
        return dict(HAS_F=pair, HAS_MASK=False, PAIR=pair, BLOCK_T=32, BLOCK_D=64)

    exact = dict(enable_fp_fusion=False)
    bucket_kernel = bucket_fused._bucket_fused_kernel
    moments_kernel = moments._moments_partial_kernel
    jobs = [
        ("bucket fused, x", bucket_kernel, XIN | hy, fused(False, 32), 8, exact),
        ("bucket fused, pair", bucket_kernel, XIN | hy, fused(True, 16), 8, exact),
        ("moments, x", moments_kernel, XIN | mom, partial(False), 8, {}),
        ("moments, pair", moments_kernel, XIN | mom, partial(True), 8, {}),
    ]
    for name, fn, ptrs, consts, nw, opts in jobs:
        rep = sass_report(fn, ptrs, consts, nw, **opts)
        per_thread = consts["BLOCK_T"] * consts["BLOCK_D"] // (32 * nw)
        per_el = [round(n / per_thread, 1) for n in rep["loops"]]
        bound = ", ".join(f"{ISSUE / max(p, 1e-9) / 1e12:.2f}e12 el/s" for p in per_el[:2])
        print(
            f"{name:20s} [{consts['BLOCK_T']}, {consts['BLOCK_D']}] x {nw} warps: "
            f"{rep['regs']} registers, spill {rep['spill']} B, {rep['ld128']} ld.v4; "
            f"loops (SASS instructions per element a thread holds): {per_el}; "
            f"issue bound of the innermost loops: {bound}"
        )


if __name__ == "__main__":
    main()
