"""A client group's batch-level loss terms, computed over the group's whole batch.

A client group splits each batch by rows (rank r of G takes rows r, r+G, ...) and DeepSpeed
averages the ranks' gradients. A per-token mean is handled by its denominator (data/task.py),
but a term that is a function of means over the batch (the model's load-balancing loss,
f . P; FedAlign-MoE's KL of the batch's mean routing; FedAMoLE's balance loss) is not the
mean of its values on the halves. So each rank gathers the others' routing (detached; it is
small: tokens x experts per layer), computes the term on the whole batch in its own order,
and scales its own part of the gradient by G: the group's average is then exactly the whole
batch's gradient, and every rank's value is the whole batch's value.

Size 1 (a client on one rank) is the identity throughout."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist


class GroupBatch:
    def __init__(self, group=None):
        """`group`: the client's GroupMPU (None or size 1: one rank)."""
        self.size = 1 if group is None else group.size
        self.rank = 0 if group is None else group.group_rank
        self._process_group = None if self.size == 1 else group.get_data_parallel_group()

    def rows(self, local: torch.Tensor) -> torch.Tensor:
        """(B/G, ...) this rank's rows -> (B, ...) the whole batch's rows in the batch's order;
        this rank's rows carry its gradient, the others' are detached."""
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.detach().contiguous(), group=self._process_group)
        parts[self.rank] = local
        return torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])  # row j*G + r is rank r's row j

    def tokens(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows * T, ...) this rank's flattened tokens -> the whole batch's, as `rows`."""
        if self.size == 1:
            return local
        whole = self.rows(local.reshape(rows, -1, *local.shape[1:]))
        return whole.reshape(-1, *local.shape[1:])

    def term(self, value: torch.Tensor | None) -> torch.Tensor | None:
        """A term computed from `rows`/`tokens`: the same value, this rank's gradient times G,
        so the group's gradient average is the term's gradient over the whole batch."""
        if value is None or self.size == 1:
            return value
        return self.size * value - (self.size - 1) * value.detach()

    def router_probs(self, tap, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """RouterTap.router_probs over the whole batch: per layer, (non-padding tokens, E)."""
        keep = self.rows(attention_mask).reshape(-1).bool()
        rows = attention_mask.shape[0]
        return [self.tokens(tap.routing_probs(layer), rows)[keep] for layer in tap.layers]

    def balance(self, model: torch.nn.Module):
        """What target_loss takes as `balance`: None on one rank (the model's own aux_loss)."""
        return None if self.size == 1 else lambda logits, mask: self.balance_loss(model, logits, mask)

    def balance_loss(self, model: torch.nn.Module, router_logits, attention_mask: torch.Tensor) -> torch.Tensor:
        """The model's own load-balancing loss (its family's load_balancing_loss_func, as its
        forward calls it) over the whole batch's routing, as `term`."""
        base = causal_lm(model)
        compute = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
        if compute is None:
            raise ValueError(f"{type(base).__name__} reports a load-balancing loss but its module has no "
                             f"load_balancing_loss_func to compute it over a client group's whole batch: "
                             f"set model.router_aux_loss_coef=0 or fed.ranks_per_client=1")
        rows = attention_mask.shape[0]
        logits = tuple(self.tokens(layer, rows) for layer in router_logits)
        return self.term(compute(logits, base.num_experts, base.num_experts_per_tok, self.rows(attention_mask)))


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine and a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
