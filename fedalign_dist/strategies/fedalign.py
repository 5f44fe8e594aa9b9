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
from fedalign_dist.aggregation.matching import MATCH_ALPHA, check_permutable, match_to_centroid, match_to_reference
from fedalign_dist.clients.routing_stats import StatsRequest, probe_batch, routing_statistics
from fedalign_dist.config_sections import ConfigSection
from fedalign_dist.strategies.base import register
from fedalign_dist.strategies.expertwise import (
    ALIGNED,
    INACTIVE,
    OWN,
    PAIRWISE,
    PERSONAL_KEY,
    AggregationPlan,
    ClientTable,
    ExpertwiseStrategy,
)


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
    renumbered into the numbering of the global model it started from, by a maximum-weight
    matching of its trained experts' signatures to the global experts' on the same probe batch
    (both sent with its statistics); global expert e then receives the client's trained expert
    pi(e) minus global expert e (weights, router row, LoRA factors), and its statistics move
    with it."""
    match_margin: float = Field(0.1, ge=0)
    """A renumbering is kept only if it raises the client's total cosine similarity to the
    global experts (summed over its active experts of the layer) by more than this: noise never
    shuffles experts that agree."""
    match_alpha: float = Field(MATCH_ALPHA, gt=0, le=1)
    """A renumbering is kept only if chance alone lines the experts up as well in at most this
    share of a permutation test's draws (the layer's similarities dealt at random:
    aggregation/matching.py, chance_of_gain): where local training rewrites the experts, the
    gain over the numbering is noise. With fewer than 4 active experts p cannot reach 0.05; 1
    turns the test off."""
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
    runs_under_client_groups = True

    def __init__(self, config, anatomy=None, store=None):
        super().__init__(config, anatomy, store)
        self.knobs = config.strategy.fedalign
        self.comm_path = self.knobs.comm
        self.prior: torch.Tensor | None = None
        """(L, E) global routing prior pi; None = uniform (before the first aggregation)."""
        # matching, client side: the global model's expert signatures on the probe batch, computed
        # once per round on this rank (for the global state `_reference_of`), and the expert
        # slices each client's start holds in place of the global ones (its personal experts)
        self._reference_of: dict | None = None
        self._reference: torch.Tensor | None = None
        self._personal_slots: dict[int, list[tuple[str, int]]] = {}
        self._warned_no_reference = False

    @classmethod
    def check_privacy(cls, config) -> None:
        if config.strategy.fedalign.mode == "pairwise":
            raise ValueError("privacy.enabled with strategy.fedalign.mode=pairwise: pairwise mixes other clients' raw "
                             "expert updates into each client's personal expert, outside the noised aggregate; "
                             "use strategy.fedalign.mode=centroid")

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
    def client_start_state(self, client_id, global_state, store):
        start = super().client_start_state(client_id, global_state, store)
        if self.knobs.match:
            if self._reference_of is not global_state:  # a new round's global model
                self._reference_of, self._reference = global_state, None
            personal = store.get(client_id, PERSONAL_KEY) or {}
            self._personal_slots[client_id] = [(name, int(e)) for name, e in (k.rsplit("|", 1) for k in personal)]
        return start

    def prepare_client_model(self, module, client_id):
        """Matching: before local training, while the module holds the global model the client
        starts from (its personal experts put back to the global ones for the pass), the global
        experts' signatures on the probe batch, once per round and rank."""
        super().prepare_client_model(module, client_id)
        slots = self._personal_slots.pop(client_id, [])
        if self.knobs.match and self._reference is None and self._reference_of is not None:
            self._reference = self._global_probe_signatures(module, self._reference_of, slots)

    def client_statistics(self, module, client):
        """Matching adds the trained experts' signatures on the probe batch (unless `signature`
        is that already) and the global model's on the same batch."""
        stats = super().client_statistics(module, client)
        if not self.knobs.match:
            return stats
        if self.knobs.signature == "probe" and client.vocab_size == self._probe_vocab(module):
            own = stats["signature"]
        else:
            own = stats["match_signature"] = self._probe_signatures(module, client.device)
        reference = self._reference
        if reference is None:  # none computed (ZeRO-3): zeros, and the coordinator uses the centroid
            if not self._warned_no_reference:
                print("WARNING: strategy.fedalign.match: under ZeRO-3 client groups the global model's expert "
                      "signatures are not computed; clients are matched to the centroid of the clients' "
                      "signatures (which needs three clients or more)", flush=True)
                self._warned_no_reference = True
            reference = torch.zeros_like(own)
        stats["match_reference"] = reference.clone()
        return stats

    def _probe_vocab(self, module) -> int:
        return int(module.config.vocab_size)

    def _probe_signatures(self, module, device=None) -> torch.Tensor:
        """(L, E, D) the module's experts on the probe batch (clients/routing_stats.py), the same
        tokens and projection for the trained model and the global one."""
        k = self.knobs
        request = StatsRequest(batches=0, signature="probe", signature_dim=k.signature_dim, seed=self.config.seed)
        device = device if device is not None else next(module.parameters()).device
        probe = probe_batch(self._probe_vocab(module), self.config.seed)
        return routing_statistics(module, self.anatomy.family, self.anatomy.num_experts, [], request, device,
                                  probe)["signature"]

    def _global_probe_signatures(self, module, global_state, slots: list[tuple[str, int]]) -> torch.Tensor | None:
        """The probe signatures of the global model, from a module that holds it except for the
        expert slices in `slots` (personal experts), which are put back for the pass. None under
        ZeRO-3 (client groups): the slices are partitions, and a group's ranks each see only their
        shard's personal experts, so they could not agree on whether the module holds the global
        model; such clients are matched to the centroid instead."""
        params = dict(module.named_parameters())
        if any(hasattr(p, "ds_id") for p in params.values()):
            return None
        saved = []
        try:
            with torch.no_grad():
                for name, e in slots:
                    param = params[name]
                    saved.append((name, e, self.anatomy.expert_slice(name, param, e).clone()))
                    value = self.anatomy.expert_slice(name, global_state[name], e)
                    self.anatomy.put_expert(name, param, e, value.to(param.device, param.dtype))
            return self._probe_signatures(module)
        finally:
            with torch.no_grad():
                for name, e, value in saved:
                    self.anatomy.put_expert(name, params[name], e, value)

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
    def aggregate(self, global_state, updates, comm):
        self._reference_of = self._reference = None  # this round's; the next global model is another
        self._personal_slots.clear()
        return super().aggregate(global_state, updates, comm)

    def renumbering(self, table: ClientTable) -> torch.Tensor | None:
        """Each client's trained experts matched to the global experts it started from, on the
        same probe batch (statistics without that reference: to the clients' centroid, which
        needs three clients or more)."""
        if not self.knobs.match:
            return None
        k, active = self.knobs, A.active_mask(table.tokens, self.knobs.min_tokens)
        reference = table.match_reference
        has = (torch.zeros(len(table.client_ids), dtype=torch.bool) if reference is None
               else reference.flatten(1).abs().sum(1) > 0)  # zeros: none was computed
        perms = None
        if not has.all():
            perms = match_to_centroid(self._signatures(table, active), active, self._centroid_mass(table),
                                      k.match_margin, groups=self.anatomy.routing_groups, alpha=k.match_alpha)
        if has.any():
            own = table.match_signature if table.match_signature is not None else table.signature
            if k.center_signatures:
                own, reference = A.centered_signatures(own, active), A.centered_signatures(reference, active)
            to_global = match_to_reference(own, active, reference, k.match_margin, groups=self.anatomy.routing_groups,
                                           alpha=k.match_alpha)
            perms = to_global if perms is None else torch.where(has[:, None, None], to_global, perms)
        return perms

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
