"""Weighted averaging as numerator / denominator so partial sums can be reduced anywhere.

A rank pre-sums sum_i w_i * delta_i and sum_i w_i over the clients it hosts; summing those
pairs over ranks (one all_reduce) and dividing gives the same weighted mean as computing
it over all clients at once (Flower/FedAvg: McMahan et al. 2017, weights = examples).
"""
from __future__ import annotations

import torch

DENOMINATOR_KEY = "__weight_sum__"


def weighted_partial_sum(deltas: list[dict[str, torch.Tensor]], weights: list[float],
                         like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sum_i w_i * delta_i per tensor, plus sum_i w_i under DENOMINATOR_KEY (fp32 accumulate)."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    out = {name: torch.zeros_like(ref, dtype=torch.float32) for name, ref in like.items()}
    for delta, weight in zip(deltas, weights):
        for name in out:
            out[name].add_(delta[name].float(), alpha=float(weight))
    out[DENOMINATOR_KEY] = torch.tensor([float(sum(weights))])
    return out


def finish_weighted_mean(summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide the reduced numerators by the reduced weight sum."""
    denom = float(summed[DENOMINATOR_KEY])
    if denom <= 0:
        raise ValueError("weight sum is zero: no client contributed to this round")
    return {name: t / denom for name, t in summed.items() if name != DENOMINATOR_KEY}


def weighted_mean(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Reference: the weighted mean computed in one place (used by tests and one-rank runs)."""
    return finish_weighted_mean(weighted_partial_sum(deltas, weights, deltas[0]))


def apply_delta(state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: (state[name].float() + delta[name].float()).to(state[name].dtype) for name in state}
