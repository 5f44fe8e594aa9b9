"""FedAMoLE (docs/algorithms.md, written from the description, not the published
code): every client holds its own subset of LoRA experts per adapted layer, chosen by
reverse selection (each expert ranks the clients); routed experts are averaged over the
clients that held them, the shared expert and token projection over all clients."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from fedalign_dist import faults
from fedalign_dist.aggregation.expert_weights import ExpertwiseWeights
from fedalign_dist.aggregation.rsea import check_feasible, random_assignment, selection_scores, solve_assignment
from fedalign_dist.clients.amole_stats import amole_embeddings, aux_indices
from fedalign_dist.config_sections import ConfigSection
from fedalign_dist.models.amole import set_held
from fedalign_dist.strategies.base import register
from fedalign_dist.strategies.expertwise import AggregationPlan, ExpertwiseStrategy, stack_rows


class FedAMoLEConfig(ConfigSection):
    """FedAMoLE knobs (docs/algorithms.md)."""
    num_experts: int = Field(30, ge=2)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    top_k: int = Field(2, ge=1)
    expert_choices: int = Field(2, ge=1)
    """beta: how many clients every expert selects (holds it) per round."""
    max_experts: int = Field(8, ge=2)
    """M: the most routed experts one client may hold per layer (at least 2)."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    aux_fraction: float = Field(0.05, gt=0, le=1)
    """Share of a client's training examples (at most aux_max) used for its embeddings."""
    aux_max: int = Field(200, ge=1)
    weighting: Literal["examples", "uniform"] = "examples"
    """Averages over holders / clients weighted by examples, or equally (the original code)."""
    balance_coef: float = Field(0.001, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.max_experts:
            raise ValueError(f"strategy.fedamole.top_k ({self.top_k}) must be <= max_experts ({self.max_experts})")
        return self


@dataclass
class EmbeddingTable:
    client_ids: list[int]
    n: torch.Tensor
    t: torch.Tensor
    """(N, layers, r) client embeddings"""
    e: torch.Tensor
    """(N, layers, E, r) expert embeddings per client (0 where not held)"""
    held: torch.Tensor
    """(N, layers, E) bool"""


@register("fedamole")
class FedAMoLE(ExpertwiseStrategy):
    config_section = FedAMoLEConfig
    model_kind = "dense"
    exports_own_format = True
    model_reveals_sample = True
    runs_under_client_groups = True

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.model.finetune == "lora":
            raise ValueError("strategy.name=fedamole trains its own LoRA experts on a frozen base; model.finetune=lora "
                             "would add nothing: remove it (size FedAMoLE's adapters with strategy.fedamole.rank)")
        k = config.strategy.fedamole
        check_feasible(k.num_experts, config.fed.num_clients, k.expert_choices, k.max_experts)

    def __init__(self, config, anatomy=None, store=None):
        super().__init__(config, anatomy, store)
        k = self.knobs = config.strategy.fedamole
        layers, clients = len(self.layer_pos), config.fed.num_clients
        self.assignment = torch.stack([torch.from_numpy(random_assignment(
            k.num_experts, clients, k.expert_choices, k.max_experts, config.seed * 1000 + layer))
            for layer in range(layers)]) if layers else torch.zeros(0, k.num_experts, clients, dtype=torch.bool)
        """(layers, E, N): X[l, i, c] = client c holds routed expert i of adapted layer l."""
        self.client_emb = torch.zeros(clients, layers, k.rank)
        self.expert_emb = torch.zeros(layers, k.num_experts, k.rank)

    @classmethod
    def build_model(cls, config, tokenizer):
        from fedalign_dist.models.build import build_amole_model
        return build_amole_model(config, tokenizer)

    # -- client side -------------------------------------------------------------------
    def prepare_client_model(self, module, client_id):
        """The client trains and is evaluated with the routed experts it holds this round."""
        set_held(module, self.assignment[:, :, client_id])

    def prepare_global_model(self, module):
        set_held(module, None)  # the global model routes over every expert

    def client_statistics(self, module, client):
        """t_c and e_{i,c} on the client's auxiliary split (a seeded sample of its training data)."""
        k = self.knobs
        idx = aux_indices(client.data.clients[client.client_id]["train"], k.aux_fraction, k.aux_max,
                          self.config.seed, client.client_id)
        return amole_embeddings(module, client.batches_of(idx), client.device)

    def model_loss(self, model, whole_batch):
        from fedalign_dist.models.amole import balance_loss
        if self.knobs.balance_coef == 0:
            return None
        loss = balance_loss(model, whole_batch.rows)
        return None if loss is None else self.knobs.balance_coef * whole_batch.term(loss)

    def make_table(self, rows):
        ids, n, stats = stack_rows(rows)
        return EmbeddingTable(ids, n, stats["t"], stats["e"], stats["held"])

    def plan(self, table: EmbeddingTable) -> AggregationPlan:
        weight = table.n if self.knobs.weighting == "examples" else torch.ones_like(table.n)
        holders = table.held.float() * weight[:, None, None]
        total = holders.sum(0, keepdim=True)
        expert_w = torch.where(total > 0, holders / total.clamp(min=1e-30), torch.zeros_like(holders))
        weights = ExpertwiseWeights(other=weight / weight.sum(), router=torch.zeros_like(holders), expert=expert_w)
        # embeddings for the next assignment: the latest t_c of each client that trained,
        # and each held expert's e_i as the mean over its holders
        self.client_emb[table.client_ids] = table.t
        held_count = table.held.float().sum(0)
        mean_e = (table.e * table.held[..., None]).sum(0) / held_count.clamp(min=1)[..., None]
        self.expert_emb = torch.where((held_count > 0)[..., None], mean_e, self.expert_emb)
        diagnostics = {"held_experts_mean": float(table.held.float().sum(-1).mean()),
                       "experts_trained_fraction": float((held_count > 0).float().mean()),
                       **self._bytes_per_client(table.held)}
        return AggregationPlan(weights, diagnostics=diagnostics)

    def reverse_selection(self) -> torch.Tensor:
        k = self.knobs
        faults.maybe_raise("rsea_solve")
        return torch.stack([torch.from_numpy(solve_assignment(
            selection_scores(self.expert_emb[layer], self.client_emb[:, layer]).numpy(), k.expert_choices,
            k.max_experts)) for layer in range(self.expert_emb.shape[0])])

    def aggregate(self, global_state, updates, comm):
        self._sizes = self._param_sizes(global_state, comm)
        new_state, diagnostics = super().aggregate(global_state, updates, comm)
        t0 = time.perf_counter()
        solved = comm.on_coordinator("the reverse-selection (RSEA) solve", self.reverse_selection)
        self.assignment = solved if solved is not None else self.assignment
        solved = {"assignment": self.assignment.to(torch.uint8)}
        comm.broadcast_(solved)  # the coordinator's assignment, for every rank
        self.assignment = solved["assignment"].bool()
        diagnostics["rsea_time_s"] = time.perf_counter() - t0
        return new_state, diagnostics

    def _param_sizes(self, state, comm) -> tuple[torch.Tensor, int]:
        """Values per routed expert in each adapted layer, and values shared by everyone (of the
        whole state, where `state` is one shard of it under client groups)."""
        per_expert, common = [0.0] * len(self.layer_pos), 0
        for name, tensor in state.items():
            role = self.anatomy.role(name)
            if role.kind == "expert":
                per_expert[self.layer_pos[role.layer]] += tensor[0].numel()
            else:
                common += tensor.numel()
        *per_expert, common = comm.sum_over_shards([*per_expert, common])
        return torch.tensor(per_expert, dtype=torch.float32), int(common)

    def _bytes_per_client(self, held: torch.Tensor) -> dict:
        """What a client downloads (its experts, the shared experts, W_t) and uploads (the same
        plus its embeddings), 4 bytes per value; means over the round's clients."""
        per_expert, common = self._sizes
        down = 4 * (common + (held.float().sum(-1) * per_expert).sum(-1))
        embeddings = 4 * self.knobs.rank * (held.shape[1] + held.float().sum((1, 2)))
        return {"download_bytes_per_client": float(down.mean()),
                "upload_bytes_per_client": float((down + embeddings).mean())}

    def export_final(self, folder, module, global_state):
        from fedalign_dist.models.amole_io import save_fedamole
        save_fedamole(folder, module, global_state, self.assignment, self.knobs.target_modules,
                      self.config.model.path)
        return True

    def state_dict(self):
        return {"assignment": self.assignment, "client_emb": self.client_emb, "expert_emb": self.expert_emb}

    def load_state_dict(self, state):
        self.assignment, self.client_emb, self.expert_emb = (state["assignment"], state["client_emb"],
                                                             state["expert_emb"])
