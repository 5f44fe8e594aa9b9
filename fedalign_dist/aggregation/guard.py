"""The update guard: a client's update enters aggregation only if it is finite (and, when
asked, not too large). Pure functions on tensors; the runner applies the verdicts."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NamedTensors = dict[str, torch.Tensor]


class DivergedError(RuntimeError):
    """The global state is non-finite: the run stops, and writes no final model or accuracy."""


@dataclass
class Verdict:
    delta: NamedTensors
    """The update to aggregate (scaled down when clipped)."""
    rejected: str | None = None
    """Why the client is left out of the round; None: accepted."""
    clipped: bool = False
    norm: float = math.nan
    """L2 norm of the whole update (before clipping), in float64."""


def nonfinite_names(tensors: dict[str, torch.Tensor | None]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def squared_norm(delta: NamedTensors) -> float:
    """In float64: a float32 sum of squares overflows long before the update itself does."""
    return sum(float(t.double().pow(2).sum()) for t in delta.values())


def update_norm(delta: NamedTensors) -> float:
    return math.sqrt(squared_norm(delta))


def screen_update(delta: NamedTensors, stats: dict, max_norm: float | None, action: str,
                  over_shards=None) -> Verdict:
    """Reject an update or statistics with non-finite values; bound the update's norm by
    `max_norm` (None: no bound) by rejecting it or scaling it down (action 'reject' | 'clip').
    `delta` may be one shard of the update (client groups): `over_shards(values)` then sums a
    list of floats over the shards, so every shard reaches the same verdict on the whole."""
    bad = nonfinite_names(delta)
    squares = squared_norm(delta) if not bad else 0.0
    counts = [len(bad), len(delta), squares]
    if over_shards is not None:
        counts = over_shards(counts)
    if counts[0]:
        first = bad[0] if bad else "in another shard"
        return Verdict(delta, f"non-finite update in {int(counts[0])} of {int(counts[1])} tensors (first: {first})")
    bad = nonfinite_names(stats)
    if bad:
        return Verdict(delta, f"non-finite statistics: {', '.join(bad)}")
    norm = math.sqrt(counts[2])
    if max_norm is None or norm <= max_norm:
        return Verdict(delta, norm=norm)
    if action == "reject":
        return Verdict(delta, f"update norm {norm:.4g} exceeds guard.max_update_norm={max_norm:g}", norm=norm)
    scale = max_norm / norm
    return Verdict({n: t * scale for n, t in delta.items()}, clipped=True, norm=norm)
