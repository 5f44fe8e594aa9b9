"""Alignment by matching (issue 27): before averaging, a client's experts are renumbered into
the global order by a maximum-weight matching of signature similarity. Renumbering moves
every tensor that belongs to an expert with it (router row and bias, fused expert weights,
per-expert LoRA factors), so the client's model computes the same function. Pure math on
named tensors: no communication, no model.

What a renumbering must respect, per family, and how it is handled here:
  - grouped routing (DeepSeek-V3 with n_group > 1): the router first picks groups of
    consecutive experts, so an expert that changes group changes the choices; the matching
    is solved within each group (`groups`), which is sufficient (whole groups could also be
    renumbered together; tests/unit/test_matching.py shows both).
  - a routing correction kept outside the federated state (DeepSeek-V3's
    e_score_correction_bias buffer): it must be the same for every expert, else a
    renumbering changes which experts are chosen; `check_permutable` refuses it otherwise.
  - shared experts (Qwen2-MoE, DeepSeek-V3) are not per-expert tensors and never move.
"""
from __future__ import annotations

import torch

PER_EXPERT = ("router", "expert", "expert_lora_A", "expert_lora_B")


def matching_permutation(similarity: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """similarity (E, E): [i, j] = how alike global expert i and the client's expert j are.
    Returns perm (E,): the client's expert perm[i] becomes expert i, chosen by a maximum-weight
    matching (scipy's linear_sum_assignment) within each of `groups` blocks of consecutive
    experts. Where keeping the numbering is as good (equal total similarity), it is kept, so
    agreeing experts never move on a tie."""
    from scipy.optimize import linear_sum_assignment
    num = similarity.shape[0]
    if similarity.shape != (num, num):
        raise ValueError(f"similarity must be square (experts x experts), got {tuple(similarity.shape)}")
    if groups < 1 or num % groups:
        raise ValueError(f"{num} experts do not split into {groups} equal routing groups")
    sim = similarity.detach().double().cpu()
    if not torch.isfinite(sim).all():
        raise ValueError("similarity holds non-finite values")
    perm = torch.arange(num)
    size = num // groups
    for g in range(groups):
        block = sim[g * size:(g + 1) * size, g * size:(g + 1) * size]
        rows, cols = linear_sum_assignment(block.numpy(), maximize=True)
        best = float(block[rows, cols].sum())
        if best > float(block.diagonal().sum()) + 1e-9 * max(1.0, abs(best)):
            perm[g * size + torch.as_tensor(rows)] = g * size + torch.as_tensor(cols)
    return perm


def permute_experts(state: dict[str, torch.Tensor], anatomy, perms: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the experts of each layer in `perms` renumbered (new expert i = old expert
    perm[i]) in every per-expert tensor of that layer; other tensors are the same objects."""
    out = dict(state)
    for name, tensor in state.items():
        role = anatomy.role(name)
        perm = perms.get(role.layer) if role.kind in PER_EXPERT else None
        if perm is None or torch.equal(perm, torch.arange(len(perm))):
            continue
        if sorted(perm.tolist()) != list(range(anatomy.num_experts)):
            raise ValueError(f"layer {role.layer}: {perm.tolist()} is not a permutation of "
                             f"{anatomy.num_experts} experts")
        moved = tensor.clone()
        for new, old in enumerate(perm.tolist()):
            anatomy.put_expert(name, moved, new, anatomy.expert_slice(name, tensor, old))
        out[name] = moved
    return out


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `perm` (back to the client's own numbering)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return inv


def routing_groups(model_config) -> int:
    """How many groups of consecutive experts the router picks among first (1: none)."""
    groups, top = getattr(model_config, "n_group", None) or 1, getattr(model_config, "topk_group", None)
    return 1 if top is not None and top >= groups else groups


def check_permutable(model) -> None:
    """Refuse a model whose routing a renumbering of its federated tensors would change: a
    per-expert routing correction outside them (a buffer) that differs between experts."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias") and buffer.numel() > 1 and not torch.all(buffer == buffer[0]):
            raise ValueError(f"{name}: the routing correction differs between experts and is not a federated "
                             f"tensor, so renumbering experts would change this {model.config.model_type} model's "
                             f"choices; alignment by matching needs it equal for every expert (as at "
                             f"initialisation) or trained with the experts")
