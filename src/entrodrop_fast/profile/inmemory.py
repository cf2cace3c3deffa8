"""In-memory runner: calibration batches through the model under the taps, all methods at once.

One forward pass per batch feeds every requested method: the entropy estimators
(``bucket``, ``gaussian_diag``, ``gaussian_full``, ``knn``, ``renyi``: ΔH per block),
``cosine`` (LLM-Drop importance 1 - mean cos(X, Y) on attn / mlp blocks, and ShortGPT's
block influence, the same on whole layers) and ``angular`` (Gromov et al.: angular distance
between the residual stream at layer l and l + n, last token, for each span n). The
forward runs the decoder stack only (no LM head, no KV cache) under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from entrodrop_fast.models.adapters import Adapter, get_adapter
from entrodrop_fast.profile.methods import (  # noqa: F401  (the method names: part of this module's API)
    ALL_METHODS,
    ENTROPY_METHODS,
    SIMILARITY_METHODS,
    parse_methods,
)
from entrodrop_fast.profile.taps import BlockStatistics, ResidualTaps, TapSettings, finite_or_raise

DEFAULT_SPANS = (1, 2, 4, 8)


@dataclass
class ProfileSettings:
    methods: tuple[str, ...] = ("bucket",)
    batch_size: int = 1
    backend: str = "auto"
    bins: int = 20
    k: int = 25
    paper_exact: bool = False
    spans: tuple[int, ...] = DEFAULT_SPANS

    def tap_settings(self) -> TapSettings:
        methods = parse_methods(self.methods)
        ent = tuple(m for m in methods if m in ENTROPY_METHODS)
        opts = {
            "bucket": {"bins": self.bins, "paper_exact": self.paper_exact},
            "knn": {"k": self.k},
        }
        opts.update(
            {
                m: {"bins": self.bins, "paper_exact": self.paper_exact}
                for m in ("bucket_q", "bucket_nosink", "bucket_tokennorm")
            }
        )
        return TapSettings(
            entropy_methods=ent,
            cosine="cosine" in methods,
            spans=tuple(self.spans) if "angular" in methods else (),
            backend=self.backend,
            entropy_opts={m: opts[m] for m in ent if m in opts},
        )


def resolved_backend(backend: str, device: torch.device) -> str:
    from entrodrop_fast.ops.api import resolve_backend

    return resolve_backend(backend, device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check(settings: ProfileSettings, windows: torch.Tensor, adapter: Adapter, num_layers: int):
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise ValueError(
            f"windows must be token ids (samples, seq_len), got shape {tuple(windows.shape)}"
        )
    if settings.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {settings.batch_size}")
    methods = parse_methods(settings.methods)
    T = windows.shape[1]
    if "knn" in methods and T <= settings.k:
        raise ValueError(f"knn needs more tokens per sample than k: seq_len {T} <= k {settings.k}")
    if any(m.startswith("bucket") for m in methods) and settings.bins < 1:
        raise ValueError(f"bins must be >= 1, got {settings.bins}")
    if "angular" in methods and not any(1 <= n <= num_layers for n in settings.spans):
        raise ValueError(f"angular: spans {settings.spans} must include one in 1..{num_layers}")


def forward_batches(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    *,
    adapter: Adapter | None = None,
    progress: bool = False,
    on_batch=None,
    desc: str = "profile",
):
    """Run the decoder stack over ``windows`` (samples, T) in batches; ``on_batch()`` after each."""
    from tqdm.auto import tqdm

    adapter = adapter or get_adapter(model)
    base = adapter.base(model)
    dev = model_device(model)
    n = windows.shape[0]
    with torch.inference_mode():
        for start in tqdm(
            range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False
        ):
            ids = windows[start : start + batch_size].to(dev)  # (b, T)
            base(input_ids=ids, use_cache=False)
            if on_batch is not None:
                on_batch()


def profile(
    model: nn.Module,
    windows: torch.Tensor,
    settings: ProfileSettings | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Profile ``model`` on token windows ``(samples, T)``. Returns plain numbers (see
    report.py)."""
    settings = settings or ProfileSettings()
    adapter = get_adapter(model)
    L = adapter.num_layers(model)
    _check(settings, windows, adapter, L)
    embed = model.get_input_embeddings()
    if (
        embed is not None and getattr(embed, "weight", None) is not None
    ):  # an id beyond the rows: refused before the first forward
        from entrodrop_fast.models.loading import check_token_ids

        check_token_ids(windows, embed.weight.shape[0])
    dev = model_device(model)
    backend = resolved_backend(settings.backend, dev)
    ts = settings.tap_settings()
    ts.backend = backend
    stats = BlockStatistics(adapter, L, ts)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with ResidualTaps(model, stats, adapter):
            forward_batches(
                model,
                windows,
                settings.batch_size,
                adapter=adapter,
                progress=progress,
                on_batch=stats.end_batch,
            )
    finally:
        model.train(was_training)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    dtype = next(model.parameters()).dtype
    return finish(stats, settings, model, seconds=seconds, windows=windows, device=dev, dtype=dtype)


def finish(
    stats: BlockStatistics,
    settings: ProfileSettings,
    model: nn.Module,
    *,
    seconds: float,
    windows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    **extra,
) -> dict:
    """Merge the statistics across ranks (if any) and turn them into the runner's result dict.

    ``stats``: the run's statistics (its adapter and resolved backend are recorded);
    ``model``: the profiled model (its config's hidden size is recorded); ``seconds``: the
    profile's wall time; ``windows``: the token ids (samples, T) profiled here; ``extra``:
    further entries of the result. Raises RuntimeError when an entropy came out NaN.
    """
    from entrodrop_fast.profile.distributed import merge_block_stats_

    adapter = stats.adapter
    merge_block_stats_(stats)  # across torch.distributed ranks, when there are several
    result = stats.result()
    finite_or_raise(result)
    result.update(
        {
            "model_type": adapter.model_type,
            "residual": adapter.residual,
            "num_layers": stats.L,
            "hidden_size": int(getattr(model.config, "hidden_size", 0) or 0),
            "methods": list(parse_methods(settings.methods)),
            "backend": stats.s.backend,
            "seconds": seconds,
            "tokens": int(windows.numel()),
            "tokens_per_s": windows.numel() / seconds if seconds > 0 else float("nan"),
            "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            **extra,
        }
    )
    return result


@contextlib.contextmanager
def grouped_warnings(emit):
    """Collect the warnings raised inside (estimators warn once per sample: a ridge added to a
    singular covariance, floored variances) and, at the end, ``emit`` one line per kind of
    warning with how many times it occurred, instead of one line per sample with file paths."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            groups: dict[str, list] = {}
            for w in caught:
                groups.setdefault(re.sub(r"[-+]?\d[\d.e+-]*", "#", str(w.message)), []).append(w)
            for ws in groups.values():
                more = f" (and {len(ws) - 1} more like it)" if len(ws) > 1 else ""
                emit(f"warning: {ws[0].message}{more}")
