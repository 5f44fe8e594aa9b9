"""FedAlign-MoE as described in docs/algorithms.md: routing-consistency
weighted, row-wise router aggregation; a batch-level KL regulariser toward the global
routing prior; semantic-consistency-gated expert averaging with personal experts."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from fedalign_dist.aggregation import alignment as A
from fedalign_dist.aggregation.expert_weights import ExpertwiseWeights
from fedalign_dist.aggregation.matching import check_permutable, match_to_centroid
from fedalign_dist.clients.routing_stats import StatsRequest
from fedalign_dist.config_sections import ConfigSection
from fedalign_dist.strategies.base import register
from fedalign_dist.strategies.expertwise import (ALIGNED, INACTIVE, OWN, PAIRWISE, AggregationPlan, ClientTable,
                                                 ExpertwiseStrategy)


class FedAlignConfig(ConfigSection):
    """FedAlign-MoE knobs (docs/algorithms.md). Ablations by config alone:
    mu=0 (no routing regulariser), consistency_temperature=inf (c_i = 1), beta=inf
    (aggregate every active client), similarity_floor=1 (the threshold as first specified)."""
    mu: float = Field(0.01, ge=0)
    """Weight of the batch-level KL(qbar || prior) routing regulariser."""
    consistency_temperature: float = Field(0.1, gt=0)
    """T_c in c_i = exp(-JS(u_i, Pbar) / T_c)."""
    beta: float = Field(1.0, ge=0)
    """Selection threshold tau = min(mean - beta * std of the similarities, similarity_floor)."""
    similarity_floor: float = Field(0.5, ge=-1.0, le=1.0)
    """A client is left out of an expert's aligned set only if its similarity is below both
    mean - beta * std and this cosine: agreeing clients are never trimmed. 1.0 = the rule as
    first specified (mean - beta * std alone)."""
    mode: Literal["centroid", "pairwise"] = "centroid"
    signature: Literal["output", "input", "probe"] = "output"
    center_signatures: bool = False
    """Compare signatures after subtracting each client's mean over its experts (per layer):
    on a pretrained base every expert's output shares a large common part, so a client
    whose experts are permuted can still look similar (docs/results.md measures it)."""
    centroid_weights: Literal["mass", "uniform"] = "mass"
    """centroid mode: the centroid of expert e weights each client by n_i u_i(e) (`mass`, as
    specified) or equally (`uniform`: one client, one vote; a client with permuted experts
    that holds most of an expert's mass otherwise becomes the centroid itself)."""
    signature_dim: int | None = Field(None, ge=1)
    """Seeded random projection of the signatures to this size (None: keep hidden size)."""
    router_rows_follow_experts: bool = True
    """Row e of a router is aggregated over expert e's aligned set only, and a client left out
    keeps its trained row e with its personal expert e. false: rows weighted by routing
    consistency alone, as first specified (a client with permuted experts looks consistent,
    so its rows were blurred while its experts were protected)."""
    match: bool = False
    """Alignment by matching (beyond the paper): before averaging, each client's experts are
    renumbered into the global order by a maximum-weight matching of their signatures to the
    global (centroid) ones, moving each expert's deltas, router row and statistics with it."""
    match_margin: float = Field(0.1, ge=0)
    """A renumbering is kept only if it raises the client's total cosine similarity to the
    centroids (summed over its active experts of the layer) by more than this: noise never
    shuffles experts that agree."""
    min_tokens: int = Field(1, ge=0)
    """A client takes part in expert e's selection only if it routed this many tokens to it."""
    stats_batches: int = Field(2, ge=1)
    comm: Literal["allgather", "reduce"] = "reduce"

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "pairwise" and self.comm != "allgather":
            raise ValueError("strategy.fedalign.mode=pairwise needs every client's expert deltas: "
                             "set strategy.fedalign.comm=allgather")
        if self.match and self.mode != "centroid":
            raise ValueError("strategy.fedalign.match=true matches experts to the centroid signatures, which only "
                             "mode=centroid has: set strategy.fedalign.mode=centroid")
        if self.centroid_weights == "uniform" and self.mode != "centroid":
            raise ValueError("strategy.fedalign.centroid_weights=uniform weights the centroid, which only "
                             "mode=centroid has (pairwise uses the mass to gate its mix)")
        return self


@register("fedalign")
class FedAlign(ExpertwiseStrategy):
    config_section = FedAlignConfig
    model_kind = "moe"

    def __init__(self, config, anatomy=None, store=None):
        super().__init__(config, anatomy, store)
        self.knobs = config.strategy.fedalign
        self.comm_path = self.knobs.comm
        self.prior: torch.Tensor | None = None
        """(L, E) global routing prior pi; None = uniform (before the first aggregation)."""

    @classmethod
    def build_model(cls, config, tokenizer):
        model, anatomy = super().build_model(config, tokenizer)
        if config.strategy.fedalign.match:
            check_permutable(model)  # a family whose routing a renumbering would change is refused
        return model, anatomy

    @property
    def personal_kinds(self) -> tuple[str, ...]:
        rows = ("router",) if self.knobs.router_rows_follow_experts else ()
        return super().personal_kinds + rows

    @property
    def stats_request(self):
        k = self.knobs
        return StatsRequest(batches=k.stats_batches, signature=k.signature, signature_dim=k.signature_dim,
                            seed=self.config.seed)

    # -- client side -------------------------------------------------------------------
    @property
    def wants_router_probs(self) -> bool:
        return self.knobs.mu > 0

    def routing_regularizer(self, router_probs):
        """mu * sum_l KL(qbar_l || pi_l), qbar_l = the batch's mean routing distribution."""
        if self.knobs.mu == 0:
            return None
        total = 0.0
        for li, probs in enumerate(router_probs):
            qbar = probs.mean(0)
            prior = (torch.full_like(qbar, 1.0 / qbar.numel()) if self.prior is None
                     else self.prior[li].to(qbar.device, qbar.dtype))
            total = total + A.kl_divergence(qbar, prior)
        return self.knobs.mu * total

    # -- coordinator side ----------------------------------------------------------------
    def renumbering(self, table: ClientTable) -> torch.Tensor | None:
        if not self.knobs.match:
            return None
        active = A.active_mask(table.tokens, self.knobs.min_tokens)
        return match_to_centroid(self._signatures(table, active), active, self._centroid_mass(table),
                                 self.knobs.match_margin, groups=self.anatomy.routing_groups)

    def _signatures(self, table: ClientTable, active: torch.Tensor) -> torch.Tensor:
        return A.centered_signatures(table.signature, active) if self.knobs.center_signatures else table.signature

    def _centroid_mass(self, table: ClientTable) -> torch.Tensor:
        """(N, L, E): each client's weight in expert e's centroid."""
        if self.knobs.centroid_weights == "uniform":  # the config allows it with mode=centroid only
            return torch.ones_like(table.usage)
        return table.n[:, None, None] * table.usage

    def plan(self, table: ClientTable) -> AggregationPlan:
        k, n, usage = self.knobs, table.n, table.usage
        consensus = A.consensus_distribution(usage, n)
        js = A.js_divergence(usage, consensus.unsqueeze(0))
        consistency = A.routing_consistency(usage, consensus, k.consistency_temperature)
        router_w = A.consistency_weights(n, consistency, usage)
        self.prior = A.routing_prior(n, consistency, usage)

        active = A.active_mask(table.tokens, k.min_tokens)
        aligned = torch.zeros_like(active)
        num_clients, num_layers, num_experts = usage.shape
        taus, sims, gates = torch.full((num_layers, num_experts), math.nan), [], {}
        select = A.pairwise_selection if k.mode == "pairwise" else A.centroid_selection
        signature, mass = self._signatures(table, active), self._centroid_mass(table)
        for li in range(num_layers):
            for e in range(num_experts):
                chosen = select(signature[:, li, e], mass[:, li, e], active[:, li, e], k.beta, k.similarity_floor)
                aligned[:, li, e] = chosen.aligned
                taus[li, e] = chosen.tau
                sims.append(chosen.similarity_mean)
                if chosen.gate is not None:
                    gates[(li, e)] = chosen.gate
        expert_w = A.expert_update_weights(n, usage, aligned)
        if k.router_rows_follow_experts:
            router_w = A.rows_without(router_w, active & ~aligned)

        personal = torch.full(active.shape, INACTIVE, dtype=torch.int8)
        personal[active & ~aligned] = PAIRWISE if k.mode == "pairwise" else OWN
        personal[aligned] = ALIGNED
        weights = ExpertwiseWeights(other=n / n.sum(), router=router_w, expert=expert_w)
        return AggregationPlan(weights, personal, gates, self._diagnostics(table, consensus, js, consistency,
                                                                           active, aligned, taus, sims))

    def _diagnostics(self, table, consensus, js, consistency, active, aligned, taus, sims) -> dict:
        def nanmean(values) -> float | None:
            values = torch.as_tensor(values, dtype=torch.float64).flatten()
            values = values[~values.isnan()]
            return float(values.mean()) if values.numel() else None

        layers = self.anatomy.layers() if self.anatomy is not None else list(range(consensus.shape[0]))
        out = {"routing_js_mean": float(js.mean()), "consistency_mean": float(consistency.mean()),
               "consistency_min": float(consistency.min()),
               "aligned_fraction": float(aligned.sum()) / max(int(active.sum()), 1),
               "tau_mean": nanmean(taus), "similarity_mean": nanmean(sims)}
        for li, layer in enumerate(layers):
            out[f"aligned_fraction_l{layer}"] = float(aligned[:, li].sum()) / max(int(active[:, li].sum()), 1)
            out[f"tau_l{layer}"] = nanmean(taus[li])
        out["routing"] = {"consensus": consensus.tolist(), "prior": self.prior.tolist(),
                          "client_usage": {str(c): table.usage[i].tolist() for i, c in enumerate(table.client_ids)}}
        return out

    def synced_state(self):
        return {"prior": self.prior}

    def state_dict(self):
        return {"prior": self.prior}

    def load_state_dict(self, state):
        self.prior = state.get("prior")
