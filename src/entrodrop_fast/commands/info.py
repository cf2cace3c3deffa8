"""``entrodrop info``: version, backends, CUDA and Triton status."""

from __future__ import annotations

import json
import platform


def collect() -> dict:
    import torch

    from entrodrop_fast import __version__, _ext
    from entrodrop_fast.ops.api import backends

    info = {
        "entrodrop_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": {
            "loaded": _ext.available(),
            "with_cuda": _ext.has_cuda(),
            "error": _ext.error(),
            "cpu_threads": _ext.require().thread_pool_cpu() if _ext.available() else None,
        },
        "backends": backends(),
    }
    for b in info["backends"].values():  # what runs here; "devices" stays what the backend supports
        b["usable_devices"] = [
            d for d in b.get("devices", []) if d != "cuda" or info["cuda_available"]
        ]
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable ({type(exc).__name__})"
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(
        f"entrodrop_fast {info['entrodrop_fast']}  python {info['python']}  "
        f"torch {info['torch']} ({info['torch_threads']} threads)"
    )
    cuda = "yes, " + str(info["cuda_device"]) if info["cuda_available"] else "no GPU visible"
    print(f"CUDA: {cuda}   triton: {info['triton']}")
    ext = info["extension"]
    print(
        f"extension _C: {'loaded' if ext['loaded'] else 'NOT loaded: ' + str(ext['error'])}"
        + (" (with CUDA kernels)" if ext["with_cuda"] else "")
    )
    if ext["cpu_threads"]:
        print(f"CPU kernels run on: {ext['cpu_threads']}")
    print("backends:")
    for name, b in info["backends"].items():
        if b["available"]:
            state = "devices " + (", ".join(b["usable_devices"]) or "none here")
            if "cuda" in b["devices"] and "cuda" not in b["usable_devices"]:
                state += " (built with CUDA kernels; no GPU visible)"
        else:
            state = f"unavailable: {b['reason']}"
        print(f"  {name:7s} {state}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="version, available backends, CUDA/Triton status")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
