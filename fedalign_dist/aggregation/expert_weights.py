"""Aggregation with a weight per (client, layer, expert): sum_i W_i (*) delta_i, where W_i is
a scalar for ordinary parameters, a per-row vector for routers and a per-expert vector for
expert tensors (fused or LoRA). Weights are normalised over all sampled clients beforehand,
so partial sums over any subset of clients simply add up (one all_reduce)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedalign_dist.models.anatomy import MoEAnatomy


@dataclass
class ExpertwiseWeights:
    other: torch.Tensor
    """(N,) weights of every non-MoE federated parameter."""
    router: torch.Tensor
    """(N, L, E) router row e of layer l."""
    expert: torch.Tensor
    """(N, L, E) expert e of layer l (every tensor that belongs to it)."""


def client_weight(anatomy: MoEAnatomy, layer_pos: dict[int, int], weights: ExpertwiseWeights,
                  row: int, name: str, ndim: int) -> torch.Tensor:
    role = anatomy.role(name)
    if role.kind == "router":
        per_expert = weights.router[row, layer_pos[role.layer]]
    elif role.kind in ("expert", "expert_lora_A", "expert_lora_B"):
        per_expert = weights.expert[row, layer_pos[role.layer]]
    else:
        return weights.other[row].float()
    return anatomy.expert_axis_weights(name, per_expert.float(), ndim)


def weighted_delta_sum(deltas: list[dict[str, torch.Tensor]], rows: list[int], weights: ExpertwiseWeights,
                       anatomy: MoEAnatomy, layer_pos: dict[int, int],
                       like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sum over the given clients (row = the client's index in the weight tables)."""
    out = {name: torch.zeros_like(ref, dtype=torch.float32) for name, ref in like.items()}
    for delta, row in zip(deltas, rows):
        for name, acc in out.items():
            acc.add_(client_weight(anatomy, layer_pos, weights, row, name, acc.ndim) * delta[name].float())
    return out
