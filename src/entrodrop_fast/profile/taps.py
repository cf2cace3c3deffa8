"""Taps: forward hooks that hand each block's X and F(X) to the estimators during the forward.

:class:`ResidualTaps` registers, for every decoder layer ``l`` (where the adapter table says
the modules are), hooks that call a *sink* with tensors of shape ``(B, T, D)``::

    sink.on_input(l, r)       # r = r_l, the residual stream entering layer l
    sink.on_attn(l, x, f)     # attn block: X = r_l, F = the term added to the stream, Y = X + F
    sink.on_mid(l, x, m)      # sequential kinds only: X = r_l, m = m_l = Y of attn (the model's)
    sink.on_mlp(li, x, f)     # mlp block: X = m_l (sequential) or r_l (parallel), Y = X + F
    sink.on_output(li, x, y)  # layer block: X = r_l, Y = r_{li+1} (layer output, pre final norm)

(see :mod:`entrodrop_fast.models.adapters` for X and Y per residual structure). The hooks
keep references to the layer input and the mid-layer residual only until the layer's
output hook returns (the model holds them anyway); no tensor is copied or kept after.
The context manager always removes its hooks, whatever happens inside.

:class:`BlockStatistics` is the sink of the profiler: in each hook it runs the estimators
at once and keeps only per-sample numbers (``[B]`` tensors on the device, no host sync).
Every residual-stream point is measured once: H(Y) of a block is H(X) of the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from entrodrop_fast._names import setting
from entrodrop_fast.models.adapters import BLOCK_KINDS, Adapter, get_adapter

# Entropy methods whose kernel reports NaN/Inf in Y (x + f overflowing fp32 included) through
# its result where the backend says so (docs/CONTRACT.md): method -> the backend op it runs.
_REPORTING_OPS = {"bucket": "bucket", "gaussian_diag": "moments", "knn": "knn_terms"}


def _overflow_hint(dtype: torch.dtype | None = None) -> str:
    """The likely cause of NaN or Inf activations, and what to try (in messages): fp16's
    range where the activations are fp16 (or unknown), else the model's weights or input."""
    if dtype is None or dtype == torch.float16:
        return f"fp16 overflow? try {setting('dtype')} bf16 or fp32"
    return (
        f"the activations are {str(dtype).removeprefix('torch.')}, so not fp16 overflow: "
        "check the checkpoint's weights for NaN/Inf"
    )


def _nonfinite(point: str, dtype: torch.dtype | None = None) -> str:
    return f"the residual stream holds NaN or Inf at {point} ({_overflow_hint(dtype)}); no report"


# ---- robust bucket variants (issue 14): bucket_q, bucket_nosink, bucket_tokennorm -------------
def _robust_estimator(method: str):
    """The estimator of a robust bucket variant (entrodrop_fast.ops.robust), None for the others."""
    if not method.startswith("bucket_"):
        return None
    from entrodrop_fast.ops.robust import ROBUST_ESTIMATORS

    return ROBUST_ESTIMATORS.get(method)


# ---- end of the robust bucket variants ----------------------------------------------------------


def _first(t):
    """The hidden-states tensor of a module output (tensor, or tuple whose [0] it is)."""
    return t[0] if isinstance(t, (tuple, list)) else t


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class ResidualTaps:
    """Context manager registering the taps of every decoder layer of ``model`` onto ``sink``."""

    def __init__(self, model: nn.Module, sink, adapter: Adapter | None = None):
        self.model = model
        self.sink = sink
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self._handles: list = []
        self._r: dict[int, torch.Tensor] = {}
        self._m: dict[int, torch.Tensor] = {}

    # -- hook factories: each closes over the layer index
    def _on_layer_in(self, li):
        def hook(module, args, kwargs):
            r = _hidden_arg(args, kwargs)
            self._r[li] = r
            self.sink.on_input(li, r)

        return hook

    def _on_attn_out(self, li):
        def hook(module, args, output):
            self.sink.on_attn(li, self._r[li], _first(output))

        return hook

    def _on_mid_in(self, li):
        def hook(module, args, kwargs):
            m = self._m[li] = _hidden_arg(args, kwargs)
            self.sink.on_mid(li, self._r[li], m)

        return hook

    def _on_mlp_out(self, li):
        def hook(module, args, output):
            x = self._m[li] if self.adapter.sequential else self._r[li]
            self.sink.on_mlp(li, x, _first(output))

        return hook

    def _on_layer_out(self, li):
        def hook(module, args, kwargs, output):
            try:
                self.sink.on_output(li, self._r[li], _first(output))
            finally:
                self._r.pop(li, None)
                self._m.pop(li, None)

        return hook

    def __enter__(self) -> ResidualTaps:
        ad = self.adapter
        try:
            for li, layer in enumerate(ad.layers(self.model)):
                h = self._handles
                h.append(layer.register_forward_pre_hook(self._on_layer_in(li), with_kwargs=True))
                h.append(ad.attn_out(layer).register_forward_hook(self._on_attn_out(li)))
                mid = ad.mid(layer)
                if mid is not None:
                    h.append(mid.register_forward_pre_hook(self._on_mid_in(li), with_kwargs=True))
                h.append(ad.mlp_out(layer).register_forward_hook(self._on_mlp_out(li)))
                h.append(layer.register_forward_hook(self._on_layer_out(li), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._r.clear()
        self._m.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


# ---------------------------------------------------------------- the profiler's sink


@dataclass
class TapSettings:
    """What BlockStatistics measures. ``entropy_opts[method]`` go to ``entropy(...)``."""

    entropy_methods: tuple[str, ...] = ("bucket",)
    cosine: bool = False
    spans: tuple[int, ...] = ()  # angular distance between r_l and r_{l+n}, last token
    backend: str = "auto"
    entropy_opts: dict = field(default_factory=dict)


class BlockStatistics:
    """Sink of :class:`ResidualTaps` computing entropies, ΔH and similarity per block.

    Per batch it collects per-sample values; :meth:`end_batch` folds them into
    :class:`~entrodrop_fast.SampleStats` (mean, standard error over samples). Results:
    :meth:`result`.
    """

    def __init__(
        self,
        adapter: Adapter,
        num_layers: int,
        settings: TapSettings,
        mask: torch.Tensor | None = None,
    ):
        from entrodrop_fast.ops.states import (
            SampleStats,  # the estimator API (ops) is imported lazily
        )

        self.adapter = adapter
        self.L = num_layers
        self.s = settings
        self.mask = mask
        self.points = adapter.points(num_layers)
        self._pidx = {p: i for i, p in enumerate(self.points)}
        P, L = len(self.points), num_layers
        self.h_stats = {m: SampleStats((P,)) for m in settings.entropy_methods}
        self.dh_stats = {
            (m, k): SampleStats((L,)) for m in settings.entropy_methods for k in BLOCK_KINDS
        }
        self.cos_stats = {k: SampleStats((L,)) for k in BLOCK_KINDS} if settings.cosine else {}
        self.ang_stats = {n: SampleStats((L - n + 1,)) for n in settings.spans if 1 <= n <= L}
        self.samples = 0
        self.finite = None  # GPU: device bool, every tensor read so far was finite (no sync)
        # (device type, backend ops) -> those ops' results tell NaN/Inf (_ops_report)
        self._reports: dict[tuple[str, tuple[str, ...]], bool] = {}
        self._reset()

    def _reset(self):
        P, L = len(self.points), self.L
        self._h: dict[str, list] = {m: [None] * P for m in self.s.entropy_methods}
        self._cos: dict[str, list] = {k: [None] * L for k in self.cos_stats}
        self._last: list = [None] * (L + 1)

    # -- estimators
    def _check_finite(self, point: str, t: torch.Tensor) -> None:
        """Never hand NaN/Inf to a kernel that does not report them (the API's validation is
        off in the hooks).

        A sum is NaN/Inf when any element is (one cheap read, no temporary the size of t).
        On CPU this is checked at once; on GPU it is folded into a device flag (no host
        sync per hook) and checked when the result is read. Not called where the entropy
        results tell (:meth:`_results_report`).
        """
        ok = torch.isfinite(t.sum(dtype=torch.float32))
        if t.device.type == "cpu":
            if not bool(ok):
                raise RuntimeError(_nonfinite(point, t.dtype))
        else:
            self.finite = ok if self.finite is None else self.finite & ok

    def _ops_report(self, device: torch.device, ops: tuple[str, ...]) -> bool:
        """Whether every one of the backend ops ``ops`` runs here on a kernel whose result is
        NaN when its input holds NaN/Inf among the valid tokens (cached per device)."""
        key = (device.type, ops)
        if key not in self._reports:
            from entrodrop_fast.ops import api

            try:
                name = api.resolve_backend(self.s.backend, device)
            except ValueError:
                name = None
            self._reports[key] = (
                name is not None
                and bool(ops)
                and all(api._reports_nonfinite(name, device, op) for op in ops)
            )
        return self._reports[key]

    def _results_report(self, device: torch.device) -> bool:
        """Whether every entropy method runs here on a kernel whose result is NaN when its
        input holds NaN/Inf among the valid tokens (or x + f overflows fp32): the cpp
        backend on CPU for bucket / gaussian_diag. Then the hooks need no pass of their own."""
        methods = self.s.entropy_methods
        if not all(m in _REPORTING_OPS for m in methods):
            return False
        return self._ops_report(device, tuple(_REPORTING_OPS[m] for m in methods))

    def _check_result(self, r: torch.Tensor, confirm) -> None:
        """A reporting kernel's result ``r``: on CPU, ``confirm()`` (the exact check, which
        raises on a real NaN/Inf) where it is not finite; on GPU a device flag, no host sync
        per hook, read once by result()."""
        if r.device.type == "cpu":
            if not bool(torch.isfinite(r).all()):
                confirm()
        else:
            ok = torch.isfinite(r).all()
            self.finite = ok if self.finite is None else self.finite & ok

    def _confirm_nonfinite(self, point: str, x, f) -> None:
        """A non-finite entropy from a reporting kernel: the exact check of x (and f, and
        their fp32 sum) over the valid tokens; raises unless it finds nothing (finite values
        the kernel's fp32 arithmetic overflowed on: the result stands, as it would have)."""
        from entrodrop_fast.ops import api

        x = api._check_dtype(x, "x")
        f = None if f is None else api._check_dtype(f, "f")
        bad, ovf = api._nonfinite_tokens(x, f, True)
        if ovf is not None:
            bad = bad | ovf
        if self.mask is not None:
            bad = bad & self.mask.to(bad.device)
        if bool(bad.any()):
            raise RuntimeError(_nonfinite(point, x.dtype))

    def _entropy(self, point: str, x, f=None, given: dict | None = None):
        """The entropies at ``point`` of x (+ f); ``given``: method -> result already computed
        (bucket, by the fused kernel with the cosine; the caller checked finiteness first)."""
        from entrodrop_fast.ops.api import entropy

        reports = self._results_report(x.device)
        if not reports and not given and not self._cosine_checks(x.device):
            self._check_finite(point, x if f is None else f)
        i = self._pidx[point]
        for m in self.s.entropy_methods:
            opts = self.s.entropy_opts.get(m, {})
            fn = _robust_estimator(m) or (lambda x, f, m=m, **kw: entropy(x, m, f, **kw))
            if given and m in given:
                h = self._h[m][i] = given[m]
            else:
                h = self._h[m][i] = fn(
                    x, f, mask=self.mask, backend=self.s.backend, validate=False, **opts
                )
            if reports:
                self._check_result(h, lambda: self._confirm_nonfinite(point, x, f))

    def _entropy_and_cosine(self, point: str, kind: str, li: int, x, f=None, y=None):
        """The entropies at ``point`` (of Y = x + f, or y) and the cosine of block (kind, li)
        between x and Y: where both bucket and the cosine are asked for, one kernel reads the
        tensors once for both (bucket_entropy_and_cosine; its bucket equals bucket_entropy's
        bit for bit)."""
        opts = self.s.entropy_opts.get("bucket", {})
        if (
            kind not in self._cos
            or "bucket" not in self.s.entropy_methods
            or not set(opts) <= {"bins", "paper_exact"}
        ):
            self._entropy(point, x, f) if y is None else self._entropy(point, y)
            self._cosine(kind, li, x, f, y)
            return
        from entrodrop_fast.ops.api import bucket_entropy_and_cosine

        if y is None:  # finiteness first, as _entropy: never hand NaN/Inf to a silent kernel
            if not self._results_report(x.device):
                self._check_finite(point, f)
        elif not self._results_report(y.device):
            self._check_finite(point, y)
        h, self._cos[kind][li] = bucket_entropy_and_cosine(
            x, f, y=y, mask=self.mask, backend=self.s.backend, validate=False, **opts
        )
        if y is None:
            self._entropy(point, x, f, given={"bucket": h})
        else:
            self._entropy(point, y, given={"bucket": h})

    def _cosine_checks(self, device: torch.device) -> bool:
        """Without entropy methods, with the cosine asked for on a kernel whose result is NaN
        when x or Y holds NaN/Inf (cpp, CPU): every point is read by some block's cosine (as
        its x or its Y), so its result stands in for the taps' own finiteness pass."""
        return (
            not self.s.entropy_methods and bool(self._cos) and self._ops_report(device, ("cosine",))
        )

    def _cosine(self, kind: str, li: int, x, f=None, y=None):
        if kind in self._cos:
            from entrodrop_fast.ops.api import cosine_importance

            c = self._cos[kind][li] = cosine_importance(
                x, f, y=y, mask=self.mask, backend=self.s.backend, validate=False
            )
            if self._cosine_checks(x.device):
                px, py = self.adapter.block_points(kind, li)

                def confirm():  # the exact check: x, then Y
                    self._confirm_nonfinite(px, x, None)
                    self._confirm_nonfinite(py, x if y is None else y, f)

                self._check_result(c, confirm)

    def _keep_last(self, li: int, r: torch.Tensor):
        if self.ang_stats:  # the last token only: a (B, 1, D) copy, not a view of r
            if self.mask is None:
                self._last[li] = r[:, -1:, :].float().clone()  # (B, 1, D)
            else:
                rows = torch.arange(r.shape[0], device=r.device)
                last = r.shape[1] - 1 - self.mask.flip(1).to(torch.int8).argmax(1)
                self._last[li] = r[rows, last].float().unsqueeze(1)  # (B, 1, D)

    # -- sink protocol
    def on_input(self, li: int, r):
        if li == 0:
            self._entropy("r0", r)
            self._keep_last(0, r)

    def on_attn(self, li: int, x, f):
        if not self.adapter.sequential:  # Y = r_l + F_attn exists nowhere: fused X + F
            self._entropy_and_cosine(f"a{li}", "attn", li, x, f)

    def on_mid(self, li: int, x, m):
        # m_l is materialised by the model (input of the next norm): read it, one tensor
        # instead of the fused r_l + F_attn (two)
        self._entropy_and_cosine(f"m{li}", "attn", li, x, y=m)

    def on_mlp(self, li: int, x, f):
        if not self.adapter.sequential:
            self._entropy_and_cosine(f"p{li}", "mlp", li, x, f)
        else:
            self._cosine("mlp", li, x, f)

    def on_output(self, li: int, x, y):
        self._entropy_and_cosine(f"r{li + 1}", "layer", li, x, y=y)
        self._keep_last(li + 1, y)

    # -- accumulation
    def end_batch(self) -> None:
        """Fold this batch's per-sample values into the running statistics."""
        from entrodrop_fast.ops.api import angular_distance

        for m, hs in self._h.items():
            missing = [self.points[i] for i, h in enumerate(hs) if h is None]
            if missing:
                raise RuntimeError(
                    f"taps saw no tensor for points {missing[:6]}: the forward did not pass "
                    "through every layer"
                )
            H = torch.stack(hs, 1)  # (B, P)
            self.h_stats[m].update(H)
            for k in BLOCK_KINDS:
                xi = [self._pidx[self.adapter.block_points(k, li)[0]] for li in range(self.L)]
                yi = [self._pidx[self.adapter.block_points(k, li)[1]] for li in range(self.L)]
                self.dh_stats[(m, k)].update(H[:, yi] - H[:, xi])  # (B, L)
            batch = H.shape[0]
        for k, cs in self._cos.items():
            self.cos_stats[k].update(torch.stack(cs, 1))  # (B, L)
            batch = cs[0].shape[0]
        for n, st in self.ang_stats.items():
            d = [
                angular_distance(self._last[li], self._last[li + n], validate=False)
                for li in range(self.L - n + 1)
            ]
            st.update(torch.stack(d, 1))  # (B, L - n + 1)
        if self._h or self._cos:
            self.samples += batch
        self._reset()

    def merge(self, other: BlockStatistics) -> BlockStatistics:
        for d, od in (
            (self.h_stats, other.h_stats),
            (self.dh_stats, other.dh_stats),
            (self.cos_stats, other.cos_stats),
            (self.ang_stats, other.ang_stats),
        ):
            for key, st in d.items():
                st.merge(od[key])
        self.samples += other.samples
        return self

    def state_dict(self) -> dict:
        return {
            "samples": self.samples,
            "h": {m: s.state_dict() for m, s in self.h_stats.items()},
            "dh": {f"{m}/{k}": s.state_dict() for (m, k), s in self.dh_stats.items()},
            "cos": {k: s.state_dict() for k, s in self.cos_stats.items()},
            "ang": {str(n): s.state_dict() for n, s in self.ang_stats.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        from entrodrop_fast.ops.states import SampleStats

        self.samples = int(d["samples"])
        self.h_stats = {m: SampleStats.from_state_dict(s) for m, s in d["h"].items()}
        self.dh_stats = {
            tuple(k.split("/")): SampleStats.from_state_dict(s) for k, s in d["dh"].items()
        }
        self.cos_stats = {k: SampleStats.from_state_dict(s) for k, s in d["cos"].items()}
        self.ang_stats = {int(n): SampleStats.from_state_dict(s) for n, s in d["ang"].items()}

    def result(self) -> dict:
        """Plain Python numbers: entropies per point, ΔH / cosine per block, angular per span."""

        def plain(st):
            r = st.result()
            return [float(v) for v in r["mean"].cpu()], [float(v) for v in r["stderr"].cpu()]

        if self.finite is not None and not bool(self.finite):
            raise RuntimeError(
                f"the residual stream holds NaN or Inf ({_overflow_hint()}); no report"
            )
        out = {
            "samples": self.samples,
            "points": list(self.points),
            "entropy": {},
            "delta": {},
            "cosine": {},
            "angular": {},
        }
        for m, st in self.h_stats.items():
            mean, se = plain(st)
            out["entropy"][m] = {"mean": mean, "stderr": se}
        for (m, k), st in self.dh_stats.items():
            mean, se = plain(st)
            out["delta"].setdefault(m, {})[k] = {"mean": mean, "stderr": se}
        for k, st in self.cos_stats.items():
            mean, se = plain(st)
            out["cosine"][k] = {"mean": mean, "stderr": se}
        for n, st in self.ang_stats.items():
            mean, se = plain(st)
            out["angular"][str(n)] = {"mean": mean, "stderr": se}
        return out


def finite_or_raise(result: dict) -> None:
    """Raise a readable error (RuntimeError) when an entropy came out NaN (NaN/Inf activations,
    usually fp16 overflow)."""
    for m, d in result["entropy"].items():
        bad = [p for p, v in zip(result["points"], d["mean"], strict=True) if math.isnan(v)]
        if bad:
            raise RuntimeError(
                f"{m}: entropy is NaN at {', '.join(bad[:6])}: the activations hold NaN or Inf "
                f"({_overflow_hint()})"
            )
