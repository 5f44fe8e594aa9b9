"""Alignment by matching (issue 27): before averaging, a client's experts are renumbered into
the global order by a maximum-weight matching of signature similarity. Renumbering moves
every tensor that belongs to an expert with it (router row and bias, fused expert weights,
per-expert LoRA factors), so the client's model computes the same function. Pure math on
named tensors: no communication, no model.

Issue 42: what is matched is the client's trained experts against the global model's experts
on the same tokens (match_to_reference; the clients' centroid, match_to_centroid, needs three
clients or more and is kept for statistics without a reference), and what global expert e then
receives is the client's trained expert pi(e) minus global expert e (aligned_delta), not the
change of expert pi(e) from where it started.

What a renumbering must respect, per family, and how it is handled here:
  - grouped routing (DeepSeek-V3 with n_group > 1): the router first picks groups of
    consecutive experts, so an expert that changes group changes the choices; the matching
    is solved within each group (`groups`: MoEAnatomy.routing_groups), which is sufficient (whole groups could also be
    renumbered together; tests/unit/test_matching.py shows both).
  - a routing correction kept outside the federated state (DeepSeek-V3's
    e_score_correction_bias buffer): it must be the same for every expert, else a
    renumbering changes which experts are chosen; `check_permutable` refuses it otherwise.
  - shared experts (Qwen2-MoE, DeepSeek-V3) are not per-expert tensors and never move.
"""
from __future__ import annotations

import numpy as np
import torch

PER_EXPERT = ("router", "expert", "expert_lora_A", "expert_lora_B")
MATCH_ALPHA = 0.05
"""strategy.fedalign.match_alpha's default: the largest chance_of_gain a renumbering may have."""


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


def check_permutable(model) -> None:
    """Refuse a model whose routing a renumbering of its federated tensors would change: a
    per-expert routing correction outside them (a buffer) that differs between experts."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias") and buffer.numel() > 1 and not torch.all(buffer == buffer[0]):
            raise ValueError(f"{name}: the routing correction differs between experts and is not a federated "
                             f"tensor, so renumbering experts would change this {model.config.model_type} model's "
                             f"choices; alignment by matching needs it equal for every expert (as at "
                             f"initialisation) or trained with the experts")


def match_to_centroid(signatures: torch.Tensor, active: torch.Tensor, mass: torch.Tensor, margin: float,
                      groups: int = 1, rounds: int = 5, alpha: float = MATCH_ALPHA) -> torch.Tensor:
    """Per client and layer, the renumbering of its experts into the global order (docs/
    algorithms.md, "Alignment by matching"): signatures (N, L, E, D), active (N, L, E) bool,
    mass (N, L, E) each client's weight in an expert's centroid. Returns perms (N, L, E):
    the client's expert perms[i, l, e] becomes expert e.

    The global signature of expert e is the mass-weighted centroid of the unit signatures
    that are numbered e; each client's active experts are matched to the centroids (inactive
    experts keep their number), kept only where the matching beats the numbering the client
    has by more than `margin` (total cosine) and beyond chance (chance_of_gain <= `alpha`), and
    the centroids are recomputed with the new numbering until nothing changes (at most `rounds`
    times): a client whose experts are permuted pulls the first centroids towards its own
    numbering, the next ones less."""
    num_clients, num_layers, num_experts, _ = signatures.shape
    unit = torch.nn.functional.normalize(signatures.double(), dim=-1) * active[..., None]
    weight = mass.double() * active
    perms = torch.arange(num_experts).expand(num_clients, num_layers, num_experts).clone()
    for _ in range(rounds):
        moved_unit = torch.gather(unit, 2, perms[..., None].expand_as(unit))
        moved_weight = torch.gather(weight, 2, perms)
        centroid = torch.nn.functional.normalize(torch.einsum("nle,nled->led", moved_weight, moved_unit), dim=-1)
        new = torch.stack(
            [
                torch.stack(
                    [
                        _client_layer_perm(unit[i, li], active[i, li], centroid[li], margin, groups, alpha)
                        for li in range(num_layers)
                    ]
                )
                for i in range(num_clients)
            ]
        )
        if torch.equal(new, perms):
            break
        perms = new
    return perms


def match_to_reference(signatures: torch.Tensor, active: torch.Tensor, reference: torch.Tensor, margin: float,
                       groups: int = 1, alpha: float = MATCH_ALPHA) -> torch.Tensor:
    """Per client and layer, the renumbering of its experts into the numbering of the global
    model it started from (docs/algorithms.md, "Alignment by matching"): signatures (N, L, E, D)
    of the client's trained experts, reference (N, L, E, D) or (L, E, D) the signatures of the
    global experts on the same tokens, active (N, L, E) bool. Returns perms (N, L, E): the
    client's expert perms[i, l, e] becomes expert e.

    Each client's active experts are matched to the global experts of the slots they hold
    (inactive experts keep their number), kept only where the matching beats the client's own
    numbering by more than `margin` (total cosine) and beyond chance (chance_of_gain <=
    `alpha`: where local training rewrote the experts, the gain is noise). Unlike match_to_centroid the reference
    does not depend on the other clients, so one client, or two, are matched as well as many.
    A reference of zeros (none could be computed) keeps the client's numbering."""
    num_clients, num_layers, num_experts, _ = signatures.shape
    if reference.dim() == 3:
        reference = reference.expand(num_clients, *reference.shape)
    if reference.shape != signatures.shape:
        raise ValueError(f"reference signatures {tuple(reference.shape)} do not match the clients' "
                         f"{tuple(signatures.shape)}")
    unit = torch.nn.functional.normalize(signatures.double(), dim=-1) * active[..., None]
    target = torch.nn.functional.normalize(reference.double(), dim=-1)
    return torch.stack(
        [
            torch.stack(
                [
                    _client_layer_perm(unit[i, li], active[i, li], target[i, li], margin, groups, alpha)
                    for li in range(num_layers)
                ]
            )
            for i in range(num_clients)
        ]
    )


def aligned_delta(delta: dict[str, torch.Tensor], start: dict[str, torch.Tensor], anatomy,
                  perms: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's update in the global numbering: global expert e receives the client's trained
    expert perm[e] minus global expert e, i.e. permute(start + delta) - start on every
    per-expert tensor of a renumbered layer (router rows and biases, expert weights or their
    slice of a fused tensor, LoRA A and B factors alike); `start` is the global state the delta
    was taken from (delta = trained - global). Moving the changes instead (permute(delta)) is
    right only where the two experts started equal, and leaves a client that holds a permuted
    copy of the global model as blurred as FedAvg. With the identity this is `delta` itself;
    tensors not renumbered are the same objects."""
    moving = {layer: p for layer, p in perms.items() if not torch.equal(p, torch.arange(len(p)))}
    for layer, perm in moving.items():
        if sorted(perm.tolist()) != list(range(anatomy.num_experts)):
            raise ValueError(f"layer {layer}: {perm.tolist()} is not a permutation of {anatomy.num_experts} experts")
    names = [n for n in delta if anatomy.role(n).kind in PER_EXPERT and anatomy.role(n).layer in moving]
    if not names:
        return delta
    out = dict(delta)
    for name in names:
        perm = moving[anatomy.role(name).layer]
        start_t = start[name].to(delta[name].dtype)
        trained = start_t + delta[name]
        moved = delta[name].clone()  # an expert that keeps its number keeps its delta bit for bit
        for new, old in enumerate(perm.tolist()):
            if new != old:
                anatomy.put_expert(name, moved, new, anatomy.expert_slice(name, trained, old)
                                   - anatomy.expert_slice(name, start_t, new))
        out[name] = moved
    return out


def _client_layer_perm(unit: torch.Tensor, active: torch.Tensor, centroid: torch.Tensor, margin: float,
                       groups: int, alpha: float = MATCH_ALPHA) -> torch.Tensor:
    """One client's layer: its active experts matched to the centroids of the slots they hold
    (an inactive expert, which learned nothing this round, keeps its number), where the gain
    over its own numbering is above `margin` and beyond chance (chance_of_gain <= alpha)."""
    num_experts = len(active)
    slots = active.nonzero().flatten()
    perm = torch.arange(num_experts)
    if len(slots) < 2:
        return perm
    similarity = centroid[slots] @ unit[slots].T  # [a, b]: global slot a vs the client's expert b
    # routing groups: a slot only takes an expert of its own group
    group_of = slots // (num_experts // groups)
    allowed = group_of[:, None] == group_of[None, :]
    similarity = torch.where(allowed, similarity, torch.full_like(similarity, -1e9))
    chosen = matching_permutation(similarity)
    matched = float(similarity[torch.arange(len(slots)), chosen].sum())
    gain = matched - float(similarity.diagonal().sum())
    if gain > margin and chance_of_gain(similarity, allowed, matched) <= alpha:
        perm[slots] = slots[chosen]
    return perm


def chance_of_gain(similarity: torch.Tensor, allowed: torch.Tensor, matched: float, draws: int = 200,
                   seed: int = 0) -> float:
    """How often chance alone lines the experts up as well: a permutation test of the best
    matching's total similarity `matched`. Each draw deals the layer's similarities at random
    over the allowed (slot, expert) pairs and solves the matching again; p = (1 + draws whose
    best total is at least `matched`) / (1 + draws). Experts that local training kept
    recognisable put their high similarities on one permutation (renumbered or not), which a
    random deal rarely does (4 experts: about 1 deal in 75; 8: 1 in 10^5), while experts it
    rewrote (similarities all near zero) are matched by noise, which the deals reproduce.
    Fewer than 4 active experts can never reach p <= 0.05. Seeded: every rank gets the same p."""
    from scipy.optimize import linear_sum_assignment
    sim = similarity.detach().double().cpu().numpy()
    mask = allowed.cpu().numpy()
    values = sim[mask]
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(draws):
        dealt = sim.copy()
        dealt[mask] = rng.permutation(values)
        rows, cols = linear_sum_assignment(dealt, maximize=True)
        hits += float(dealt[rows, cols].sum()) >= matched - 1e-12
    return (1 + hits) / (1 + draws)


def renumbering_diagnostics(perms: torch.Tensor, client_ids: list[int], layers: list[int]) -> dict:
    """The round's renumbering for the metrics: experts moved per client (all layers), per
    layer (all clients), and how many clients had any expert moved."""
    moved_NL = (perms != torch.arange(perms.shape[-1])).sum(-1)
    per_client = moved_NL.sum(-1)
    return {"matched_clients": int((per_client > 0).sum()), "experts_moved": int(per_client.sum()),
            **{f"experts_moved_l{layer}": int(moved_NL[:, li].sum()) for li, layer in enumerate(layers)},
            "experts_moved_per_client": {str(c): int(m) for c, m in zip(client_ids, per_client)}}
