"""The client's statistics pass after local training (no grad): how it routes and what its
experts do, from the model's own router outputs.

Per MoE layer l and expert e:
  usage[l, e]     mean over tokens of p_l(x)_e, the distribution the family's router routes
                  with (models/routing.py: softmax, or DeepSeek-V3's biased sigmoid scores)
  load[l, e]      share of the top-k slots that went to e
  tokens[l, e]    tokens that had e in their top-k
  signature[l, e] what expert e does, in R^d:
      output  gate-weighted mean of e's output over the tokens routed to it
      input   mean hidden state routed to e
      probe   mean of e's output on a fixed probe batch built from the shared seed
              (random vocabulary tokens: the signature holds no private activation, but it
              is a function of the client's trained weights, and usage, load and tokens are
              still measured on the private batches)
  optionally projected by a seeded Gaussian matrix shared by every rank (cosines survive:
  Johnson-Lindenstrauss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from fedalign_dist.models.families import Family
from fedalign_dist.models.router_tap import RouterTap

SignatureMode = Literal["output", "input", "probe"]
PROBE_SHAPE = (4, 32)


@dataclass(frozen=True)
class StatsRequest:
    batches: int
    signature: SignatureMode | None = None
    signature_dim: int | None = None
    seed: int = 0


def projection_matrix(hidden: int, dim: int, seed: int) -> torch.Tensor:
    """(hidden, dim) Gaussian / sqrt(dim): the same on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 0x51C)
    return torch.randn(hidden, dim, generator=gen) / dim ** 0.5


def probe_batch(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 0x9B0BE)
    ids = torch.randint(0, vocab_size, PROBE_SHAPE, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(PROBE_SHAPE[1]).expand(PROBE_SHAPE).contiguous()}


def expert_output(experts: nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert `expert` alone on every row of `hidden`, through the model's own experts module
    (adapters and family-specific activations included)."""
    n = hidden.shape[0]
    index = torch.full((n, 1), expert, dtype=torch.long, device=hidden.device)
    weight = torch.ones((n, 1), dtype=hidden.dtype, device=hidden.device)
    return experts(hidden, index, weight)


def _add_output_signatures(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                           num_experts: int, sig_num: torch.Tensor, sig_den: torch.Tensor) -> None:
    """Add each expert's gate-weighted output sum over the tokens routed to it (and the gate
    sum) into sig_num (E, d) and sig_den (E,). One call of the experts module for all of them:
    each token routed to e appears once as a row for e, so an adapted (LoRA) experts module
    builds its weights once per layer, not once per expert."""
    rows, experts_of_rows, gates = [], [], []
    for e in range(num_experts):
        chosen = indices == e
        routed = chosen.any(-1)
        if routed.any():
            rows.append(hidden[routed])
            experts_of_rows.append(torch.full((int(routed.sum()), 1), e, dtype=torch.long, device=hidden.device))
            gates.append((weights * chosen).sum(-1)[routed])
    if not rows:
        return
    index = torch.cat(experts_of_rows)
    out = experts(torch.cat(rows), index, torch.ones(index.shape, dtype=hidden.dtype, device=hidden.device)).float()
    gate = torch.cat(gates)
    sig_num.index_add_(0, index[:, 0].cpu(), (gate[:, None] * out).double().cpu())
    sig_den.index_add_(0, index[:, 0].cpu(), gate.double().cpu())


def _forward(module: nn.Module, batch: dict[str, torch.Tensor], device) -> None:
    module(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
           position_ids=batch["position_ids"].to(device), logits_to_keep=1)


@torch.no_grad()
def routing_statistics(module: nn.Module, family: Family, num_experts: int, batches: Iterable[dict],
                       request: StatsRequest, device: torch.device,
                       probe: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor | None]:
    was_training = module.training
    module.eval()
    mode = request.signature
    tap = RouterTap(module, family, keep_hidden=mode is not None)
    L, E = len(tap.layers), num_experts
    prob_sum, counts = torch.zeros(L, E, dtype=torch.float64), torch.zeros(L, E, dtype=torch.float64)
    num_tokens, slots = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    sig_num, sig_den = None, torch.zeros(L, E, dtype=torch.float64)
    with tap:
        for batch in batches:
            _forward(module, batch, device)
            keep = batch["attention_mask"].reshape(-1).bool().to(device)
            for li, layer in enumerate(tap.layers):
                rec = tap.records[layer]
                probs = tap.routing_probs(layer, keep)
                indices, weights = rec.indices[keep], rec.weights[keep].float()
                prob_sum[li] += probs.sum(0).double().cpu()
                num_tokens[li] += probs.shape[0]
                counts[li] += torch.bincount(indices.reshape(-1), minlength=E)[:E].double().cpu()
                slots[li] += indices.numel()
                if mode in ("output", "input"):
                    hidden = rec.hidden[keep]
                    if sig_num is None:
                        sig_num = torch.zeros(L, E, hidden.shape[-1], dtype=torch.float64)
                    if mode == "output":
                        _add_output_signatures(
                            tap.experts(layer), hidden, indices, weights, E, sig_num[li], sig_den[li]
                        )
                        continue
                    for e in range(E):
                        rows = (indices == e).any(-1)
                        if rows.any():
                            sig_num[li, e] += hidden[rows].float().sum(0).double().cpu()
                            sig_den[li, e] += float(rows.sum())
        if mode == "probe":
            if probe is None:
                raise ValueError("signature mode 'probe' needs a probe batch")
            _forward(module, probe, device)
            for li, layer in enumerate(tap.layers):
                hidden = tap.records[layer].hidden
                outs = [expert_output(tap.experts(layer), hidden, e).float().mean(0) for e in range(E)]
                if sig_num is None:
                    sig_num = torch.zeros(L, E, hidden.shape[-1], dtype=torch.float64)
                sig_num[li] = torch.stack(outs).double().cpu()
                sig_den[li] = 1.0
    module.train(was_training)
    stats = {"usage": (prob_sum / num_tokens.clamp(min=1)[:, None]).float(),
             "load": (counts / slots.clamp(min=1)[:, None]).float(),
             "tokens": counts.float(), "signature": None}
    if mode is not None:
        if sig_num is None:  # no routed token at all: every expert inactive, signatures zero
            sig_num = torch.zeros(L, E, module.config.hidden_size, dtype=torch.float64)
        signature = (sig_num / sig_den.clamp(min=1e-12)[..., None]).float()
        if request.signature_dim:
            signature = signature @ projection_matrix(signature.shape[-1], request.signature_dim, request.seed)
        stats["signature"] = signature
    return stats
