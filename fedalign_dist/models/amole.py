"""AMoLE: an adaptive mixture of LoRA experts around a frozen linear layer (FedAMoLE,
docs/algorithms.md):

    y = W0 x + s B_sh A_sh x + sum_{i in TopK over held} g_i s B_i A_i x,     s = alpha / r
    z_i = <A_i x, W_t x> / sqrt(r) for the experts the client holds; p = softmax(z);
    top-k, gates renormalised over the top-k.

Each routed expert's routing key is its own A matrix, so any subset can be plugged in: the
subset is the `held` buffer (E,) bool, set per client. Routed experts are stored fused,
expert axis first (A: (E, r, in), B: (E, out, r)), like the MoE models' fused experts.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class AMoLELinear(nn.Module):
    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, top_k: int):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.num_experts, self.rank, self.scale, self.top_k = num_experts, rank, alpha / rank, top_k
        bound = 1 / math.sqrt(d_in)  # LoRA's usual init: A uniform, B zero (output unchanged)
        self.shared_A = nn.Parameter(torch.empty(rank, d_in).uniform_(-bound, bound))
        self.shared_B = nn.Parameter(torch.zeros(d_out, rank))
        self.experts_A = nn.Parameter(torch.empty(num_experts, rank, d_in).uniform_(-bound, bound))
        self.experts_B = nn.Parameter(torch.zeros(num_experts, d_out, rank))
        self.token_proj = nn.Parameter(torch.empty(rank, d_in).uniform_(-bound, bound))
        self.register_buffer("held", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self.routing: tuple | None = None  # (probs, top-k slots, k) of the last forward
        self._embeddings: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lora_x = x.to(self.shared_A.dtype)
        y = y + self.scale * (lora_x @ self.shared_A.T) @ self.shared_B.T
        idx = self.held.nonzero().flatten()
        if idx.numel() == 0:
            self.routing = None
            return y
        a, b = self.experts_A[idx], self.experts_B[idx]                     # (h, r, in), (h, out, r)
        ax = torch.einsum("...d,hrd->...hr", lora_x, a)                      # (..., h, r)
        tx = lora_x @ self.token_proj.T                                      # (..., r)
        probs = torch.softmax((ax * tx.unsqueeze(-2)).sum(-1) / math.sqrt(self.rank), dim=-1)
        k = min(self.top_k, idx.numel())
        top_val, top_idx = probs.topk(k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_val / top_val.sum(-1, keepdim=True))
        expert_out = torch.einsum("...hr,hor->...ho", ax, b)                 # (..., h, out)
        y = y + self.scale * torch.einsum("...h,...ho->...o", gates, expert_out).to(y.dtype)
        # for the load balance (balance_loss): each token's probabilities and its top-k slots
        self.routing = (probs, torch.zeros_like(probs).scatter(-1, top_idx, 1.0), k)
        if self._embeddings is not None:
            self._accumulate(ax.detach(), tx.detach(), idx)
        return y

    def _accumulate(self, ax, tx, idx) -> None:
        keep = self._embeddings["mask"]
        flat_ax, flat_tx = ax.reshape(-1, *ax.shape[-2:]), tx.reshape(-1, tx.shape[-1])
        if keep is not None:
            flat_ax, flat_tx = flat_ax[keep], flat_tx[keep]
        self._embeddings["t"] += flat_tx.double().sum(0).cpu()
        self._embeddings["e"][idx.cpu()] += flat_ax.double().sum(0).cpu()
        self._embeddings["tokens"] += flat_tx.shape[0]


def amole_modules(model: nn.Module) -> dict[str, AMoLELinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AMoLELinear)}


def wrap_linear_layers(model: nn.Module, target_modules: list[str], num_experts: int, rank: int, alpha: float,
                       top_k: int) -> list[str]:
    """Replace every nn.Linear whose name ends with a target (e.g. q_proj) by an AMoLELinear."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]
    if not targets:
        raise ValueError(f"no linear layer named {target_modules} in the model")
    for name, linear in targets:
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, AMoLELinear(linear, num_experts, rank, alpha, top_k))
    return [name for name, _ in targets]


def balance_loss(model: nn.Module, rows=lambda t: t) -> torch.Tensor | None:
    """The AMoLE modules' load balances summed (module_balance)."""
    losses = [loss for m in amole_modules(model).values() if (loss := module_balance(m, rows)) is not None]
    return torch.stack(losses).sum() if losses else None


def module_balance(module: "AMoLELinear", rows=lambda t: t) -> torch.Tensor | None:
    """|S| * sum_i P_i f_i (mean probability x share of top-k slots) over the tokens of the
    module's last forward; `rows` widens its (B, ...) records to the whole batch (a client
    group's: clients/group_batch.py)."""
    if module.routing is None:
        return None
    probs, slots, k = module.routing
    held = probs.shape[-1]
    flat_p, flat_slots = (rows(t).reshape(-1, held) for t in (probs, slots))
    return held * (flat_p.mean(0) * (flat_slots.mean(0) / k)).sum()


def set_held(model: nn.Module, held: torch.Tensor | None) -> None:
    """held: (modules, E) bool in amole_modules order; None = every expert."""
    for i, module in enumerate(amole_modules(model).values()):
        module.held.copy_(torch.ones_like(module.held) if held is None else held[i].to(module.held.device))


class EmbeddingCollector:
    """Context manager: every AMoLE module sums W_t x (t) and A_i x (e, for each held expert)
    over the tokens of each forward; `set_mask` selects the non-padding ones."""

    def __init__(self, model: nn.Module):
        self.modules = list(amole_modules(model).values())

    def __enter__(self) -> "EmbeddingCollector":
        for m in self.modules:
            m._embeddings = {"t": torch.zeros(m.rank, dtype=torch.float64),
                             "e": torch.zeros(m.num_experts, m.rank, dtype=torch.float64), "tokens": 0, "mask": None}
        return self

    def set_mask(self, attention_mask: torch.Tensor) -> None:
        for m in self.modules:
            m._embeddings["mask"] = attention_mask.reshape(-1).bool().to(m.experts_A.device)

    def results(self) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (modules, r) and e: (modules, E, r), means over tokens (e is 0 for experts not held)."""
        t = torch.stack([m._embeddings["t"] / max(m._embeddings["tokens"], 1) for m in self.modules])
        e = torch.stack([m._embeddings["e"] / max(m._embeddings["tokens"], 1) for m in self.modules])
        return t.float(), e.float()

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            m._embeddings = None
