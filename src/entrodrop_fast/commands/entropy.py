"""``entrodrop entropy FILE``: the estimators on a tensor stored as .npy, .pt or .safetensors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def load_tensor(path: str, key: str | None = None) -> torch.Tensor:
    """The tensor stored in ``path`` (.npy, .pt/.pth or .safetensors; ``key`` picks one of several).

    A file that cannot be parsed (empty, truncated, corrupt, not the format its suffix
    says) raises a ValueError naming the file; OSErrors (unreadable file) pass through.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path} is a directory; give a .npy, .pt or .safetensors file")
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".pt", ".pth", ".safetensors"):
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .npy, .pt or .safetensors")
    if suffix == ".npy" and key is not None:
        raise ValueError(
            f"--key names a tensor inside a .pt/.safetensors file; {path} is a .npy file "
            "holding one array: drop --key"
        )
    if p.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); write the tensor again")
    try:
        if suffix == ".npy":
            import numpy as np

            obj = torch.from_numpy(np.load(p, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            import warnings

            with warnings.catch_warnings():  # torch warns before failing on a non-torch file
                warnings.simplefilter("ignore")
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as exc:
        # the readers raise many types (EOFError, SafetensorError, UnpicklingError,
        # RuntimeError, ValueError) for a bad file
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if len(why) > 200:  # torch's messages run on; their first sentence says it
            why = why.split(". ")[0] + "."
        if suffix != ".npy" and type(exc).__name__ == "UnpicklingError":
            why += " torch.load(weights_only=True) reads only tensors and plain containers of them"
        raise ValueError(
            f"{path}: cannot read it as a {suffix} tensor file; it may be truncated or corrupt "
            f"({type(exc).__name__}: {why})"
        ) from exc
    return obj if suffix == ".npy" else _pick(obj, key, path)


def _pick(obj, key, path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        if key is None:
            if len(obj) != 1:
                raise ValueError(
                    f"{path} holds {len(obj)} tensors ({', '.join(list(obj)[:8])}); "
                    "choose one with --key"
                )
            key = next(iter(obj))
        if key not in obj:
            raise ValueError(f"{path} has no tensor {key!r}; it has {', '.join(list(obj)[:8])}")
        if not isinstance(obj[key], torch.Tensor):
            raise ValueError(f"{path}: {key!r} holds a {type(obj[key]).__name__}, not a tensor")
        return obj[key]
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a tensor")


def compute(
    x: torch.Tensor,
    methods,
    backend: str,
    bins: int,
    k: int,
    alpha: float,
    paper_exact: bool,
    nan_policy: str = "raise",
) -> list[dict]:
    from entrodrop_fast.ops.api import entropy, resolve_backend

    opts = {
        "bucket": {"bins": bins, "paper_exact": paper_exact},
        "knn": {"k": k},
        "renyi": {"alpha": alpha},
    }
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        try:
            h = entropy(x, m, backend=backend, nan_policy=nan_policy, **opts.get(m, {}))
        except (
            ValueError
        ) as exc:  # name the method (and knn's k), and the CLI's flag for nan_policy
            text = str(exc).replace("pass nan_policy='omit'", "pass --nan-policy omit")
            raise ValueError(f"{m}{f' (k={k})' if m == 'knn' else ''}: {text}") from None
        dt = time.perf_counter() - t0
        vals = h.reshape(-1).tolist()
        used = (
            backend
            if m in ("gaussian_full", "renyi") and backend != "auto"
            else resolve_backend(backend, x.device)
        )
        rows.append(
            {
                "method": m,
                "entropy": vals[0] if x.dim() == 2 else vals,
                "backend": used,
                "seconds": dt,
            }
        )
    return rows


def run(args) -> int:
    from entrodrop_fast.ops.api import METHODS

    x = load_tensor(args.file, args.key)
    methods = (
        [m.strip() for m in args.method.split(",")]
        if args.method
        else ["bucket", "gaussian_diag", "knn"]
    )
    if methods == ["all"]:  # as profile --method all
        methods = list(METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    rows = compute(
        x, methods, args.backend, args.bins, args.k, args.alpha, args.paper_exact, args.nan_policy
    )
    if args.json:
        print(
            json.dumps(
                {"file": args.file, "shape": list(x.shape), "dtype": str(x.dtype), "results": rows},
                indent=2,
            )
        )
        return 0
    print(f"{args.file}: shape {tuple(x.shape)} {x.dtype} (entropies in nats)")
    print(f"{'method':15s} {'backend':8s} {'seconds':>9s}  entropy")
    for r in rows:
        e = r["entropy"]
        shown = (
            f"{e:.6f}"
            if isinstance(e, float)
            else "[" + ", ".join(f"{v:.4f}" for v in e[:6]) + (", ..." if len(e) > 6 else "") + "]"
        )
        print(f"{r['method']:15s} {r['backend']:8s} {r['seconds']:9.4f}  {shown}")
    return 0


def register(sub) -> None:
    from entrodrop_fast.cli import positive_int

    p = sub.add_parser(
        "entropy", help="entropy estimators on a stored tensor ([N, D] or [B, T, D])"
    )
    p.add_argument("file", help=".npy, .pt or .safetensors file")
    p.add_argument("--key", help="tensor name inside a .pt/.safetensors dict")
    p.add_argument(
        "--method",
        help="comma-separated: bucket,gaussian_diag,gaussian_full,knn,renyi, or all "
        "(default bucket,gaussian_diag,knn)",
    )
    p.add_argument("--backend", default="auto", help="auto, cuda, cpp, triton or torch")
    p.add_argument(
        "--bins", type=positive_int, default=20, help="bucket: bins per channel (default 20)"
    )
    p.add_argument("--k", type=positive_int, default=25, help="knn: neighbour rank (default 25)")
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument(
        "--paper-exact",
        action="store_true",
        help="clamp bucket probabilities at 1e-10 as the paper's code",
    )
    p.add_argument(
        "--nan-policy",
        default="raise",
        choices=["raise", "omit"],
        help="tokens holding NaN / Inf: raise an error (default) or omit them",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
