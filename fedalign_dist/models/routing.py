"""The routing distribution each family's router actually routes with, from its logits.

FedAlign-MoE's usage, prior and KL regulariser need p_l(x), a distribution over experts
whose top-k is the model's choice:
  softmax          Mixtral, Qwen2/3-MoE, OLMoE pick the top-k of softmax(logits); GPT-OSS
                   picks the top-k logits and softmaxes them, the same order, so its full
                   softmax is its distribution too.
  sigmoid_grouped  DeepSeek-V3 scores experts with sigmoid(logits), adds the (untrained)
                   `e_score_correction_bias` to choose, and keeps only the `topk_group`
                   groups of experts with the highest top-2 sums. Its distribution is the
                   choice score over the eligible experts, normalised: DeepSeek-V3's
                   normalised affinity s_e / sum_j s_j when the bias is zero, and always
                   with the model's own top-k.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

RoutingKind = Literal["softmax", "sigmoid_grouped"]


def sigmoid_grouped_distribution(logits: torch.Tensor, bias: torch.Tensor, num_groups: int,
                                 groups_kept: int) -> torch.Tensor:
    """(tokens, E) logits -> (tokens, E) distribution, zero outside the kept groups."""
    choice = torch.sigmoid(logits.float()) + bias.float()
    tokens, experts = choice.shape
    grouped = choice.detach().view(tokens, num_groups, experts // num_groups)
    group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    kept_groups = group_score.topk(groups_kept, dim=-1).indices
    eligible = torch.zeros_like(group_score).scatter(1, kept_groups, 1.0)
    eligible = eligible.repeat_interleave(experts // num_groups, dim=1)
    # a correction bias can push a score below zero: such an expert is never preferred to
    # one with a positive score, so it gets (almost) no mass; the floor keeps the row a
    # distribution when every eligible score is negative
    mass = choice.clamp(min=0) * eligible + 1e-12 * eligible
    return mass / mass.sum(-1, keepdim=True)


def _router_core(router: nn.Module, attribute: str) -> nn.Module:
    """The router itself under wrappers (PEFT's modules_to_save keeps copies of it)."""
    for module in router.modules():
        if hasattr(module, attribute):
            return module
    raise ValueError(f"router {type(router).__name__} has no '{attribute}'")


def routing_distribution(kind: RoutingKind, logits: torch.Tensor, router: nn.Module) -> torch.Tensor:
    """p(x) per token, float32, differentiable w.r.t. the router's weights."""
    if kind == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if kind == "sigmoid_grouped":
        core = _router_core(router, "e_score_correction_bias")
        return sigmoid_grouped_distribution(logits, core.e_score_correction_bias, core.num_group, core.topk_group)
    raise ValueError(f"unknown routing kind '{kind}'")
