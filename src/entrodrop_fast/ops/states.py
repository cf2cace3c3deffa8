"""Streaming, mergeable estimator states.

Each state has ``update(...)``, ``merge(other)``, ``result()`` and a plain serialisable
form (``state_dict()`` / ``from_state_dict(d)``: a dict of tensors and numbers) so partial
results can be saved, resumed and all-reduced across processes. Merging uses Chan et al.'s
pairwise formulas, so ``a.update(x1); b.update(x2); a.merge(b)`` equals updating one state
with ``x1 ++ x2`` (up to rounding).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch

from entrodrop_fast.ops import api


def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge (count, mean, M2) of two sets; counts may be numbers or tensors."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


class SampleStats:
    """Running mean and standard error of per-sample values (e.g. ΔH of every block).

    ``update(v)`` takes ``v`` of shape ``[B, *shape]`` (B samples) and stays on v's device
    without host synchronisation; ``result()`` gives mean, standard error of the mean and n.
    """

    def __init__(self, shape: tuple[int, ...] | list[int] = ()):
        self.shape = tuple(shape)
        self.n = 0
        self.mean: torch.Tensor | None = None  # fp64 [*shape] once a sample is seen
        self.m2: torch.Tensor | None = None

    def update(self, v: torch.Tensor) -> SampleStats:
        """Fold in ``v`` [B, *shape] (any real dtype, read as fp64); ValueError for another
        shape."""
        v = torch.as_tensor(v).to(torch.float64)
        if tuple(v.shape[1:]) != self.shape:
            raise ValueError(
                f"values must have shape {list(('B', *self.shape))} (B samples), "
                f"got {list(v.shape)}".replace("'", "")
            )
        nb = v.shape[0]
        if nb == 0:
            return self
        mean_b = v.mean(0)
        m2_b = ((v - mean_b) ** 2).sum(0)
        self._merge_parts(nb, mean_b, m2_b)
        return self

    def _merge_parts(self, nb, mean_b, m2_b):
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mean_b.clone(), m2_b.clone()
        else:
            mean_b, m2_b = mean_b.to(self.mean.device), m2_b.to(self.mean.device)
            self.n, self.mean, self.m2 = _chan(self.n, self.mean, self.m2, nb, mean_b, m2_b)

    def merge(self, other: SampleStats) -> SampleStats:
        if other.shape != self.shape:
            raise ValueError(f"cannot merge SampleStats of shape {other.shape} into {self.shape}")
        if other.n:
            self._merge_parts(other.n, other.mean, other.m2)
        return self

    def result(self) -> dict[str, Any]:
        """``mean`` and ``stderr`` (fp64 [*shape]; stderr NaN for one sample) and ``n``.
        ValueError before the first sample."""
        if self.n == 0 or self.mean is None or self.m2 is None:
            raise ValueError("SampleStats has no samples yet")
        nan = torch.full_like(self.mean, float("nan"))
        stderr = (self.m2 / (self.n - 1) / self.n).sqrt() if self.n > 1 else nan
        return {"mean": self.mean, "stderr": stderr, "n": self.n}

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "SampleStats",
            "shape": list(self.shape),
            "n": self.n,
            "mean": self.mean,
            "m2": self.m2,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> SampleStats:
        s = cls(d["shape"])
        s.n, s.mean, s.m2 = int(d["n"]), d["mean"], d["m2"]
        return s


class MomentState:
    """Pooled per-channel count, mean, M2, min and max over every token seen.

    ``update`` reads X (or X + F) through the chosen backend's moments kernel.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0.0
        # fp64 [dim] (mean, m2) and fp32 [dim] (min, max) once a token is seen
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(
        self,
        x: api.Array,
        f: api.Array | None = None,
        *,
        mask: api.Array | None = None,
        backend: str = "auto",
        nan_policy: str = "raise",
    ) -> MomentState:
        """Fold in the valid tokens of x (or x + f): ``[N, D]`` or ``[B, T, D]`` with D = dim,
        as the estimators of :mod:`entrodrop_fast.ops.api` take them (at least 1 valid token
        per sample), with their TypeError / ValueError; ValueError for another D."""
        p = api.prepare(
            x, f, mask, min_tokens=1, nan_policy=nan_policy, backend=backend, op="moments"
        )
        if p.x.shape[-1] != self.dim:
            if p.deferred:  # NaN/Inf are reported first, as when prepare checked them
                api._recheck(p, min_tokens=1, nan_policy=nan_policy)
            raise ValueError(f"MomentState expects {self.dim} channels, got {p.x.shape[-1]}")
        p, m = api._checked_moments(p, min_tokens=1, nan_policy=nan_policy)
        for b in range(p.x.shape[0]):  # merge the per-sample moments one by one
            self._merge_parts(
                float(m["count"][b]), m["mean"][b], m["m2"][b], m["min"][b], m["max"][b]
            )
        return self

    def _merge_parts(self, n, mean, m2, mn, mx):
        if n == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2, self.min, self.max = (
                n,
                mean.clone(),
                m2.clone(),
                mn.clone(),
                mx.clone(),
            )
            return
        self.count, self.mean, self.m2 = _chan(self.count, self.mean, self.m2, n, mean, m2)
        self.min = torch.minimum(self.min, mn)
        self.max = torch.maximum(self.max, mx)

    def merge(self, other: MomentState) -> MomentState:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge MomentState of {other.dim} channels into {self.dim}")
        self._merge_parts(other.count, other.mean, other.m2, other.min, other.max)
        return self

    def result(self, var_floor: float = 1e-12) -> dict[str, Any]:
        """``count``, per channel ``mean``, ``var`` (population, fp64), ``min``, ``max``, and
        ``gaussian_diag_entropy`` (0-d fp64, nats; variances floored at ``var_floor``).
        ValueError before the first token."""
        var_floor = api._real(
            var_floor, "var_floor", lo=0.0, why=" (0 gives -inf for a constant channel)"
        )
        if self.count == 0 or self.m2 is None:
            raise ValueError("MomentState has seen no tokens yet")
        var = self.m2 / self.count
        h = 0.5 * torch.log((2 * math.pi * math.e) * var.clamp_min(var_floor)).sum()
        return {
            "count": self.count,
            "mean": self.mean,
            "var": var,
            "min": self.min,
            "max": self.max,
            "gaussian_diag_entropy": h,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "MomentState",
            "dim": self.dim,
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> MomentState:
        s = cls(int(d["dim"]))
        s.count, s.mean, s.m2, s.min, s.max = (
            float(d["count"]),
            d["mean"],
            d["m2"],
            d["min"],
            d["max"],
        )
        return s


class CovState:
    """Pooled D x D covariance: count, mean and the centred comoment sum (x - mean)(x - mean)^T.

    Each update centres its rows on their own fp64 mean before the product, and batches
    merge with Chan's formula, so large-offset channels do not cancel.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0.0
        # fp64 [dim] and [dim, dim] once a token is seen
        self.mean: torch.Tensor | None = None
        self.comoment: torch.Tensor | None = None

    def update(
        self,
        x: api.Array,
        f: api.Array | None = None,
        *,
        mask: api.Array | None = None,
        nan_policy: str = "raise",
    ) -> CovState:
        """Fold in the valid tokens of x (or x + f): ``[N, D]`` or ``[B, T, D]`` with D = dim,
        as the estimators of :mod:`entrodrop_fast.ops.api` take them (at least 1 valid token
        per sample; the torch backend), with their TypeError / ValueError; ValueError for
        another D."""
        p = api.prepare(x, f, mask, min_tokens=1, nan_policy=nan_policy, backend="torch")
        if p.x.shape[-1] != self.dim:
            raise ValueError(f"CovState expects {self.dim} channels, got {p.x.shape[-1]}")
        for b in range(p.x.shape[0]):
            r = api._rows(p, b).double()  # (N, D)
            mean = r.mean(0)
            c = r - mean
            self._merge_parts(float(r.shape[0]), mean, c.T @ c)
        return self

    def _merge_parts(self, n, mean, com):
        if n == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.comoment = n, mean.clone(), com.clone()
            return
        tot = self.count + n
        delta = mean - self.mean
        self.comoment = self.comoment + com + torch.outer(delta, delta) * (self.count * n / tot)
        self.mean = self.mean + delta * (n / tot)
        self.count = tot

    def merge(self, other: CovState) -> CovState:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge CovState of {other.dim} channels into {self.dim}")
        self._merge_parts(other.count, other.mean, other.comoment)
        return self

    def result(self, ridge: float = 0.0) -> dict[str, Any]:
        """``count``, ``mean``, ``cov`` (population, fp64 [dim, dim]) and
        ``gaussian_full_entropy`` (0-d fp64, nats, of cov + ridge I; -inf when singular).
        ValueError before the first token."""
        ridge = api._real(ridge, "ridge", lo=0.0, why=" (0 gives -inf for a singular covariance)")
        if self.count == 0 or self.comoment is None:
            raise ValueError("CovState has seen no tokens yet")
        cov = self.comoment / self.count
        eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        sign, logdet = torch.linalg.slogdet(cov + ridge * eye)
        h = (
            0.5 * (self.dim * math.log(2 * math.pi * math.e) + logdet)
            if sign > 0
            else torch.tensor(float("-inf"), dtype=torch.float64)
        )
        return {"count": self.count, "mean": self.mean, "cov": cov, "gaussian_full_entropy": h}

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "CovState",
            "dim": self.dim,
            "count": self.count,
            "mean": self.mean,
            "comoment": self.comoment,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> CovState:
        s = cls(int(d["dim"]))
        s.count, s.mean, s.comoment = float(d["count"]), d["mean"], d["comoment"]
        return s


class EntropyMeter:
    """Per-sample entropy of a stream of batches by one method, with its running mean/stderr.

    ``update`` returns the batch's per-sample entropies ``[B]`` (so callers can form ΔH
    per sample) and folds them into a :class:`SampleStats`.
    """

    def __init__(self, method: str = "bucket", **opts: Any):
        if method not in api.METHODS:
            raise ValueError(
                f"unknown entropy method {method!r}; choose from {', '.join(api.METHODS)}"
            )
        self.method, self.opts = method, opts
        self.stats = SampleStats()

    def update(self, x: api.Array, f: api.Array | None = None, **kw: Any) -> torch.Tensor:
        h = api.entropy(x, self.method, f, **self.opts, **kw)
        h = torch.as_tensor(h)
        self.stats.update(h.reshape(-1))
        return h

    def merge(self, other: EntropyMeter) -> EntropyMeter:
        if (other.method, other.opts) != (self.method, self.opts):
            raise ValueError("cannot merge meters of different methods or options")
        self.stats.merge(other.stats)
        return self

    def result(self) -> dict[str, Any]:
        return self.stats.result()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "EntropyMeter",
            "method": self.method,
            "opts": dict(self.opts),
            "stats": self.stats.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> EntropyMeter:
        m = cls(d["method"], **d["opts"])
        m.stats = SampleStats.from_state_dict(d["stats"])
        return m


_State = TypeVar("_State", SampleStats, MomentState, CovState, EntropyMeter)


def all_reduce_(state: _State, group: Any = None) -> _State:
    """Merge a state across all ``torch.distributed`` ranks, in place; every rank ends equal.

    Works for :class:`SampleStats`, :class:`MomentState`, :class:`CovState` and
    :class:`EntropyMeter` (gloo on CPU, NCCL on GPU). Each rank's state is gathered and
    merged in rank order, so the result does not depend on which rank computes it.
    """
    local = state.state_dict()
    parts = gather_state_dicts(local, group)
    kind = type(state)
    merged = kind.from_state_dict(parts[0])
    for d in parts[1:]:
        merged.merge(kind.from_state_dict(d))
    dev = _device_of(local)
    restored = kind.from_state_dict(_to_device(merged.state_dict(), dev))
    state.__dict__.update(restored.__dict__)
    return state


def gather_state_dicts(local: dict[str, Any], group: Any = None) -> list[dict[str, Any]]:
    """Every rank's ``local`` state dict (tensors on the CPU), in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "merging across ranks needs an initialised torch.distributed process group"
        )
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, _to_cpu(local), group=group)
    return parts


def _to_cpu(d):
    if isinstance(d, torch.Tensor):
        return d.cpu()
    if isinstance(d, dict):
        return {k: _to_cpu(v) for k, v in d.items()}
    return d


def _to_device(d, dev):
    if isinstance(d, torch.Tensor):
        return d.to(dev) if dev is not None else d
    if isinstance(d, dict):
        return {k: _to_device(v, dev) for k, v in d.items()}
    return d


def _device_of(d):
    if isinstance(d, torch.Tensor):
        return d.device
    if isinstance(d, dict):
        for v in d.values():
            dev = _device_of(v)
            if dev is not None:
                return dev
    return None
