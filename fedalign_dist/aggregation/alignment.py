"""FedAlign-MoE's coordinator mathematics as pure functions on tensors (no communication).

Shapes: N sampled clients, L MoE layers, E experts, d signature size. `n` (N,) examples.
Definitions: docs/algorithms.md ("FedAlign-MoE").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-8


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """sum_e p_e log(p_e / q_e) over the last axis, both clamped at eps (differentiable)."""
    p, q = p.clamp(min=eps), q.clamp(min=eps)
    return (p * (p.log() - q.log())).sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) over the last axis."""
    m = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def consensus_distribution(usage: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Pbar_l = sum_i n_i u_{i,l} / sum_i n_i: (N, L, E) -> (L, E)."""
    w = n.double() / n.double().sum()
    return torch.einsum("n,nle->le", w, usage.double()).to(usage.dtype)


def routing_consistency(usage: torch.Tensor, consensus: torch.Tensor, temperature: float) -> torch.Tensor:
    """c_{i,l} = exp(-JS(u_{i,l}, Pbar_l) / T_c): (N, L). T_c = inf switches it off (c = 1)."""
    if math.isinf(temperature):
        return torch.ones(usage.shape[:2], dtype=usage.dtype)
    return torch.exp(-js_divergence(usage, consensus.unsqueeze(0)) / temperature)


def consistency_weights(n: torch.Tensor, consistency: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """w_{i,l}(e) = n_i c_{i,l} u_{i,l}(e) / sum_j n_j c_{j,l} u_{j,l}(e): (N, L, E), sums to 1 over N."""
    mass = n.double()[:, None, None] * consistency.double()[:, :, None] * usage.double()
    total = mass.sum(0, keepdim=True)
    by_examples = (n.double() / n.double().sum())[:, None, None].expand_as(mass)
    # A row nobody routes to (all zero mass) falls back to examples weighting.
    return torch.where(total > 0, mass / total.clamp(min=1e-300), by_examples).to(usage.dtype)


def rows_without(weights: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Router row weights (N, L, E) with the `excluded` (client, layer, expert) entries left
    out and the rest renormalised per (l, e): a router row belongs to its expert, so a client
    left out of expert e's aligned set is left out of row e too. A row whose every weighted
    client is excluded keeps its weights."""
    kept = weights.double() * (~excluded).double()
    total = kept.sum(0, keepdim=True)
    return torch.where(total > 0, kept / total.clamp(min=1e-300), weights.double()).to(weights.dtype)


def routing_prior(n: torch.Tensor, consistency: torch.Tensor, usage: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """pi_l = normalise(sum_i n_i c_{i,l} u_{i,l} + eps): (L, E)."""
    mass = (n.double()[:, None, None] * consistency.double()[:, :, None] * usage.double()).sum(0) + eps
    return (mass / mass.sum(-1, keepdim=True)).to(usage.dtype)


def active_mask(tokens: torch.Tensor, min_tokens: float) -> torch.Tensor:
    """Clients whose expert saw at least `min_tokens` routed tokens: (N, L, E) bool."""
    return tokens >= min_tokens


def centered_signatures(signatures: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Each client's signatures minus their mean over its active experts of the same layer:
    (N, L, E, D). What every expert's output shares (on a pretrained model, a common
    direction of the residual stream) makes any two experts' raw signatures look alike;
    what is left is what tells experts apart. Inactive experts stay zero."""
    weight = active.to(signatures.dtype)[..., None]
    mean = (signatures * weight).sum(2, keepdim=True) / weight.sum(2, keepdim=True).clamp(min=1)
    return (signatures - mean) * weight


def _unit(h: torch.Tensor) -> torch.Tensor:
    return h / h.norm(dim=-1, keepdim=True).clamp(min=EPS)


@dataclass
class Selection:
    aligned: torch.Tensor
    """(N,) bool; never set for inactive clients; never empty when some client is active."""
    tau: float
    """The threshold; nan where undefined (fewer than 3 active clients, or beta = inf)."""
    similarity_mean: float
    """centroid: mean s_i; pairwise: mean sim_ij over pairs i != j (nan if undefined)."""
    gate: torch.Tensor | None = None
    """pairwise only: (N, N) personalisation weights g_ij, rows of active clients sum to 1."""


def outlier_threshold(mean: float, std: float, beta: float, floor: float) -> float:
    """tau = min(mean - beta * std, floor): a client is left out only if it is both an outlier
    and dissimilar. Similarities are cosines, so floor = 1 is the plain mean - beta * std rule,
    which always trims the low tail, even when every client agrees."""
    return min(mean - beta * std, floor)


def centroid_selection(signatures: torch.Tensor, mass: torch.Tensor, active: torch.Tensor,
                       beta: float, floor: float = 1.0) -> Selection:
    """One (layer, expert): z = normalise(sum_i mass_i hhat_i) over active clients;
    s_i = hhat_i . z; aligned = {s_i >= min(mean(s) - beta * std(s), floor)} (population std)."""
    aligned = torch.zeros(active.shape[0], dtype=torch.bool)
    idx = active.nonzero().flatten()
    if idx.numel() == 0:
        return Selection(aligned, math.nan, math.nan)
    unit = _unit(signatures[idx].double())
    centre = _unit((mass[idx].double()[:, None] * unit).sum(0))
    score = unit @ centre
    if idx.numel() < 3 or math.isinf(beta):
        aligned[idx] = True
        return Selection(aligned, math.nan, float(score.mean()))
    tau = outlier_threshold(float(score.mean()), float(score.std(unbiased=False)), beta, floor)
    keep = score >= tau
    keep[score.argmax()] = True
    aligned[idx[keep]] = True
    return Selection(aligned, tau, float(score.mean()))


def pairwise_selection(signatures: torch.Tensor, mass: torch.Tensor, active: torch.Tensor,
                       beta: float, floor: float = 1.0) -> Selection:
    """One (layer, expert): sim_ij = hhat_i . hhat_j over active clients; tau = min(M - beta * S,
    floor) (mean and population std over pairs i != j); aligned = {i: mean_{j != i} sim_ij >= tau};
    gate g_ij proportional to 1[sim_ij >= tau] mass_j, with j = i always in."""
    num = active.shape[0]
    aligned = torch.zeros(num, dtype=torch.bool)
    gate = torch.zeros(num, num, dtype=torch.float64)
    idx = active.nonzero().flatten()
    m = idx.numel()
    if m == 0:
        return Selection(aligned, math.nan, math.nan, gate)
    unit = _unit(signatures[idx].double())
    sim = unit @ unit.T
    off = ~torch.eye(m, dtype=torch.bool)
    sim_mean = float(sim[off].mean()) if m > 1 else math.nan
    if m < 3 or math.isinf(beta):
        tau, keep, linked = math.nan, torch.ones(m, dtype=torch.bool), torch.ones(m, m, dtype=torch.bool)
    else:
        tau = outlier_threshold(float(sim[off].mean()), float(sim[off].std(unbiased=False)), beta, floor)
        row_mean = (sim * off).sum(1) / (m - 1)
        keep = row_mean >= tau
        keep[row_mean.argmax()] = True
        linked = (sim >= tau) | ~off
    aligned[idx[keep]] = True
    g = linked.double() * mass[idx].double()[None, :]
    g = torch.where(g.sum(1, keepdim=True) > 0, g, (~off).double())  # zero mass: keep its own expert
    gate[idx[:, None], idx[None, :]] = g / g.sum(1, keepdim=True)
    return Selection(aligned, tau, sim_mean, gate)


def expert_update_weights(n: torch.Tensor, usage: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """Global expert update weights n_i u_i(e) over the aligned set, normalised per (l, e):
    (N, L, E); an expert no client is aligned on gets all-zero weights (it stays unchanged)."""
    mass = n.double()[:, None, None] * usage.double() * aligned.double()
    total = mass.sum(0, keepdim=True)
    return torch.where(total > 0, mass / total.clamp(min=1e-300), torch.zeros_like(mass)).to(usage.dtype)


def token_weights(tokens: torch.Tensor) -> torch.Tensor:
    """FedMoE-style: expert e averaged over the clients that routed tokens to it, weighted
    by those token counts: (N, L, E); all zero where nobody routed to e."""
    total = tokens.double().sum(0, keepdim=True)
    return torch.where(total > 0, tokens.double() / total.clamp(min=1e-300),
                       torch.zeros_like(tokens, dtype=torch.float64)).float()
