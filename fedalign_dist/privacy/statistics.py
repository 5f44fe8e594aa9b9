"""The statistics a client sends, brought to a bounded sensitivity and noised (pure).

Every statistic is first normalised by a rule that holds whatever the client's data:
  distribution   each row (last axis) made non-negative and summed to 1: usage, load, and
                 tokens (sent as shares; scaled back by the public token budget of the
                 statistics pass, so thresholds on counts keep their meaning)
  unit           each vector (last axis) scaled to unit L2 norm (cosines are unchanged):
                 expert signatures, FedAMoLE's client and expert embeddings
  public         not derived from the client's data (FedAMoLE's `held`: the coordinator's
                 assignment; matching's `match_reference`): sent as it is
then divided by sqrt(rows), so each statistic has L2 norm <= 1 and the k noised ones
together <= sqrt(k). Gaussian noise of std z * sqrt(k) per element makes the release a
Gaussian mechanism of multiplier z for the whole row (replacing a client's data moves it by at
most 2 sqrt(k)). After the noise only post-processing: distributions clipped at 0 and
renormalised, token shares scaled by the budget.
"""
from __future__ import annotations

import math

import torch

BOUNDS: dict[str, str] = {"usage": "distribution", "load": "distribution", "tokens": "distribution",
                          "signature": "unit", "match_signature": "unit", "t": "unit", "e": "unit", "held": "public",
                          "match_reference": "public"}
"""match_reference: the global model's expert signatures on the public probe batch (alignment by
matching), a function of the published global model alone."""


def bound_of(key: str) -> str:
    if key not in BOUNDS:
        raise ValueError(f"statistic '{key}' has no declared bound (fedalign_dist/privacy/statistics.py BOUNDS): "
                         f"under privacy.enabled it cannot be sent; declare how it is normalised")
    return BOUNDS[key]


def _rows(t: torch.Tensor) -> int:
    return max(1, t.numel() // max(1, t.shape[-1])) if t.dim() else 1


def bounded(key: str, value: torch.Tensor) -> torch.Tensor:
    """The statistic normalised by its rule and divided by sqrt(rows): L2 norm <= 1 for any input."""
    x = value.double()
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    rule = bound_of(key)
    if rule == "distribution":
        x = x.clamp(min=0)
        total = x.sum(-1, keepdim=True)
        x = torch.where(total > 0, x / total.clamp(min=1e-300), torch.zeros_like(x))
    elif rule == "unit":
        norm = x.norm(dim=-1, keepdim=True)
        x = torch.where(norm > 0, x / norm.clamp(min=1e-300), torch.zeros_like(x))
    return x / math.sqrt(_rows(x))


def noised_keys(stats: dict) -> list[str]:
    return [k for k, v in stats.items() if v is not None and bound_of(k) != "public"]


def privatize(stats: dict, multiplier: float, gen: torch.Generator, token_budget: float) -> dict:
    """The statistics as the client sends them: bounded, noised with `multiplier`, post-processed
    (same dtypes and shapes as given). Keys in sorted order draw the noise, so it is reproducible."""
    keys = sorted(noised_keys(stats))
    scale = multiplier * math.sqrt(len(keys))
    out = dict(stats)
    for key in keys:
        value = stats[key]
        x = bounded(key, value)
        x = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale
        x = x * math.sqrt(_rows(x))
        if bound_of(key) == "distribution":
            x = x.clamp(min=0)
            total = x.sum(-1, keepdim=True)
            x = torch.where(total > 0, x / total.clamp(min=1e-300), torch.full_like(x, 1.0 / x.shape[-1]))
            if key == "tokens":
                x = x * token_budget
        out[key] = x.to(value.dtype) if value.is_floating_point() else x.round().to(value.dtype)
    return out
