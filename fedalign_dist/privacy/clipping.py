"""Bounding one client's contribution (pure): its whole update scaled to an L2 norm of at
most C, and the adaptive bound of Andrew et al. (2021), "Differentially Private Learning with
Adaptive Clipping"."""
from __future__ import annotations

import math

import torch

from fedalign_dist.aggregation.guard import update_norm

NamedTensors = dict[str, torch.Tensor]


def clip_update(delta: NamedTensors, bound: float, norm: float | None = None) -> tuple[NamedTensors, float]:
    """(delta scaled to norm <= bound, its norm before). A delta within the bound is returned
    as it is (the same tensors), so clipping that does not bite changes no bit. `norm`: the
    whole update's, when `delta` is one shard of it (client groups)."""
    norm = update_norm(delta) if norm is None else norm
    if norm <= bound:
        return delta, norm
    scale = bound / norm
    return {name: t * scale for name, t in delta.items()}, norm


def next_clip_norm(bound: float, noised_within: float, clients: int, target_quantile: float,
                   learning_rate: float) -> float:
    """Geometric update towards the target quantile of the update norms:
    C <- C * exp(-lr * (b - q)), b = the noised fraction of clients whose norm was <= C."""
    if clients <= 0:
        return bound
    return bound * math.exp(-learning_rate * (noised_within / clients - target_quantile))
