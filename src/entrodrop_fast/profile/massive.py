"""Massive activations: how much of each channel's histogram range a few tokens set, and which.

The paper's bucket estimator bins every channel over the sample's [min, max]. Where a few
tokens carry values hundreds of times larger than the rest ("massive activations", usually
the first token of the window and some delimiters), those tokens alone set [min, max] and
the other tokens crowd into one bin. :func:`range_share` measures this on one tensor;
:func:`diagnose` runs calibration windows through a model and measures it at every point
of the residual stream (r_0 = embeddings, r_l = output of layer l - 1), with the tokens
responsible; :func:`plot` draws the figure.

Definitions, per sample (T tokens) and channel d of a residual-stream tensor:

- the ``top`` most extreme tokens of channel d: the ``top`` largest ``|x_td - median_t x_td|``;
- ``share_d = 1 - range(x_d without those tokens) / range(x_d)`` (0 for a constant channel):
  the part of the histogram range set by the top tokens alone;
- ``crowd_d``: the fraction of the T tokens in the fullest of ``bins`` equal bins over
  [min, max] (the paper's histogram; 1/bins for a uniform channel, 1 when one token holds
  the whole range).
"""

from __future__ import annotations

import math
import unicodedata

import torch


def range_share(x: torch.Tensor, top: int = 3, bins: int = 20) -> dict:
    """Per channel of one sample ``x`` [T, D] (any float dtype, read as fp32):

    returns ``{"share": [D] fp32, "crowd": [D] fp32, "extreme": [top, D] int64}`` with
    ``extreme`` the token indices (0-based positions) of the ``top`` most extreme tokens of
    each channel (most extreme first). Raises ValueError unless x is 2-D with T > top + 1.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    T, D = x.shape
    if not isinstance(top, int) or top < 1 or T < top + 2:
        raise ValueError(
            f"need an integer top >= 1 and at least top + 2 tokens, got top={top!r} and T={T}"
        )
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    x = x.float()
    med = x.median(0).values  # (D,)
    extreme = (x - med).abs().topk(top, dim=0).indices  # (top, D)
    mn, mx = x.amin(0), x.amax(0)
    width = mx - mn  # (D,)
    keep = torch.ones_like(x, dtype=torch.bool)
    keep.scatter_(0, extreme, False)
    inner_mx = torch.where(keep, x, torch.full_like(x, -math.inf)).amax(0)
    inner_mn = torch.where(keep, x, torch.full_like(x, math.inf)).amin(0)
    share = torch.where(
        width > 0,
        1 - (inner_mx - inner_mn) / torch.where(width > 0, width, torch.ones_like(width)),
        torch.zeros_like(width),
    )
    from entrodrop_fast.ops.reference import bucket_bin_index

    idx = bucket_bin_index(x, bins)  # (T, D), the contract's bins
    counts = torch.zeros(D, bins, dtype=torch.int64)
    counts.scatter_add_(1, idx.t().contiguous(), torch.ones(D, T, dtype=torch.int64))
    crowd = counts.amax(1).float() / T
    return {"share": share, "crowd": crowd, "extreme": extreme}


def token_class(text: str, position: int) -> str:
    """'first' (position 0 of the window), 'punct/space' (no letter or digit), or 'word'."""
    if position == 0:
        return "first"
    if not any(unicodedata.category(c)[0] in "LN" for c in text):
        return "punct/space"
    return "word"


class _Collector:
    """Sink of :class:`entrodrop_fast.profile.taps.ResidualTaps` keeping range statistics of r_l."""

    def __init__(self, num_layers: int, top: int, bins: int):
        self.top, self.bins = top, bins
        self.points = [f"r{i}" for i in range(num_layers + 1)]
        self.share = {p: [] for p in self.points}  # per sample: [D] tensors
        self.crowd = {p: [] for p in self.points}
        self.extreme = {p: [] for p in self.points}  # per sample: [top, D]
        self.norm_ratio = {
            p: [] for p in self.points
        }  # per sample: max-token L-inf / median-token L-inf

    def _add(self, point: str, r: torch.Tensor) -> None:
        for b in range(r.shape[0]):
            s = range_share(r[b], self.top, self.bins)
            self.share[point].append(s["share"])
            self.crowd[point].append(s["crowd"])
            self.extreme[point].append(s["extreme"])
            linf = r[b].float().abs().amax(1)  # (T,)
            self.norm_ratio[point].append(float(linf.max() / linf.median().clamp_min(1e-30)))

    def on_input(self, li, r):
        if li == 0:
            self._add("r0", r)

    def on_attn(self, li, x, f):
        pass

    def on_mid(self, li, x, m):
        pass

    def on_mlp(self, li, x, f):
        pass

    def on_output(self, li, x, y):
        self._add(f"r{li + 1}", y)


def diagnose(
    model,
    tokenizer,
    windows: torch.Tensor,
    *,
    top: int = 3,
    bins: int = 20,
    batch_size: int = 8,
    examples: int = 8,
) -> dict:
    """Range statistics of the residual stream at every layer boundary of ``model``.

    ``windows``: token ids (samples, T) with T > top + 1. Returns per point r_0..r_L:
    ``share_mean`` (mean over samples and channels of share_d), ``share_half`` (fraction of
    channels whose top tokens set more than half the range), ``crowd_mean`` (mean fullest-bin
    fraction), ``norm_ratio`` (median over samples of max / median token L-inf norm), ``where``
    (of all the per-channel extreme slots: the fractions at the first position, on
    punctuation/space tokens, on word tokens) and ``tokens`` (the ``examples`` token strings
    most often extreme, with counts and the mean position).
    """
    from entrodrop_fast.models.adapters import get_adapter
    from entrodrop_fast.profile.inmemory import forward_batches
    from entrodrop_fast.profile.taps import ResidualTaps

    if windows.dim() != 2 or windows.shape[1] < top + 2:
        raise ValueError(
            "windows must be (samples, T) token ids with T >= top + 2, got shape "
            f"{tuple(windows.shape)}"
        )
    adapter = get_adapter(model)
    L = adapter.num_layers(model)
    sink = _Collector(L, top, bins)
    was = model.training
    model.eval()
    try:
        with ResidualTaps(model, sink, adapter):
            forward_batches(model, windows, batch_size, adapter=adapter)
    finally:
        model.train(was)
    vocab_text: dict[int, str] = {}

    def text(tok: int) -> str:
        if tok not in vocab_text:
            vocab_text[tok] = tokenizer.decode([tok]) if hasattr(tokenizer, "decode") else str(tok)
        return vocab_text[tok]

    out = {
        "top": top,
        "bins": bins,
        "samples": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "points": [],
    }
    for p in sink.points:
        share = torch.stack(sink.share[p])  # (S, D)
        crowd = torch.stack(sink.crowd[p])
        ext = torch.stack(sink.extreme[p])  # (S, top, D)
        S = ext.shape[0]
        tok_ids = windows[torch.arange(S)[:, None, None], ext]  # (S, top, D)
        where = {"first": 0, "punct/space": 0, "word": 0}
        per_token: dict[int, list[int]] = {}
        pos_flat, tok_flat = ext.flatten().tolist(), tok_ids.flatten().tolist()
        for pos, tok in zip(pos_flat, tok_flat, strict=True):
            where[token_class(text(tok), pos)] += 1
            per_token.setdefault(tok, []).append(pos)
        n = len(pos_flat)
        common = sorted(per_token.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:examples]
        ratios = sorted(sink.norm_ratio[p])
        out["points"].append(
            {
                "point": p,
                "share_mean": float(share.mean()),
                "share_half": float((share > 0.5).float().mean()),
                "crowd_mean": float(crowd.mean()),
                "norm_ratio": ratios[len(ratios) // 2],
                "where": {k: v / n for k, v in where.items()},
                "tokens": [
                    {
                        "text": text(t),
                        "id": int(t),
                        "count": len(ps),
                        "share": len(ps) / n,
                        "mean_position": sum(ps) / len(ps),
                    }
                    for t, ps in common
                ],
            }
        )
    return out


def markdown(diag: dict) -> str:
    """A table of :func:`diagnose`'s result, one row per point of the residual stream."""
    columns = (
        "point",
        "range set by top tokens (mean)",
        "channels > 50%",
        "fullest bin (mean)",
        "max/median token L∞",
        "extremes at first position / punct / word",
        "most frequent extreme tokens",
    )
    lines = [
        f"Top {diag['top']} tokens per channel, {diag['samples']} windows of {diag['seq_len']} "
        f"tokens, {diag['bins']} bins.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in diag["points"]:
        w = r["where"]
        toks = ", ".join(
            f"{t['text']!r} ({100 * t['share']:.0f}%, pos {t['mean_position']:.0f})"
            for t in r["tokens"][:3]
        )
        shares = f"{100 * r['share_mean']:.1f}% | {100 * r['share_half']:.1f}%"
        where = f"{100 * w['first']:.0f}% / {100 * w['punct/space']:.0f}% / {100 * w['word']:.0f}%"
        lines.append(
            f"| {r['point']} | {shares} | {100 * r['crowd_mean']:.1f}% | {r['norm_ratio']:.1f} | "
            f"{where} | {toks} |"
        )
    return "\n".join(lines) + "\n"


def plot(diag: dict, path, title: str = "") -> None:
    """Figure: per layer boundary, the range share of the top tokens and the fullest-bin
    fraction (left), and where the extreme tokens are (right, stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = diag["points"]
    xs = list(range(len(pts)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.plot(
        xs,
        [100 * r["share_mean"] for r in pts],
        marker="o",
        label=f"range set by the top {diag['top']} tokens (mean over channels)",
    )
    a.plot(
        xs,
        [100 * r["share_half"] for r in pts],
        marker=".",
        label="channels where they set > 50% of it",
    )
    a.plot(
        xs,
        [100 * r["crowd_mean"] for r in pts],
        marker="s",
        label=f"tokens in the fullest of {diag['bins']} bins",
    )
    a.set_xlabel("residual stream r_l (l = layers before it)")
    a.set_ylabel("%")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    bottom = [0.0] * len(pts)
    for key in ("first", "punct/space", "word"):
        vals = [100 * r["where"][key] for r in pts]
        b.bar(xs, vals, bottom=bottom, label=key)
        bottom = [u + v for u, v in zip(bottom, vals, strict=True)]
    b.set_xlabel("residual stream r_l")
    b.set_ylabel("% of the per-channel extreme tokens")
    b.legend(fontsize=7)
    fig.suptitle(title or "massive activations and the bucket histogram range")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
