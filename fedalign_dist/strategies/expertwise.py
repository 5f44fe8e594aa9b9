"""Shared machinery of strategies that aggregate expert by expert from routing statistics
(FedMoE-style, FedAlign-MoE): gather the small statistics, let the subclass turn them into
a plan (pure), apply it through one of two communication paths, keep personal experts.

  reduce     all-gather statistics only; each rank pre-sums sum_i W_i delta_i over its own
             clients; one all_reduce gives the update. Bytes per rank ~ 2x the delta size.
  allgather  all-gather statistics and every client's delta; the coordinator (rank 0)
             computes the new global state and broadcasts it. Bytes grow with clients.
"""
from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass, field

import torch

from fedalign_dist.aggregation.expert_weights import ExpertwiseWeights, client_weight, weighted_delta_sum
from fedalign_dist.aggregation.matching import aligned_delta, renumbering_diagnostics
from fedalign_dist.aggregation.weighted import apply_delta
from fedalign_dist.clients.routing_stats import probe_batch, routing_statistics
from fedalign_dist.distributed.collectives import flatten, unflatten
from fedalign_dist.strategies.base import ClientUpdate, NamedTensors, Strategy

PERSONAL_KEY = "personal_experts"

# What happens to a client's expert (l, e) after aggregation.
ALIGNED, OWN, PAIRWISE, INACTIVE = 0, 1, 2, 3
"""ALIGNED: drop its personal copy; OWN: keep its trained expert as personal copy;
PAIRWISE: keep the gated mix of similar clients' experts; INACTIVE: unchanged (a personal
copy it already has is refreshed with the trained one)."""


@dataclass
class ClientTable:
    """Every sampled client's statistics, in client-id order (the same on every rank)."""
    client_ids: list[int]
    n: torch.Tensor
    usage: torch.Tensor
    load: torch.Tensor
    tokens: torch.Tensor
    signature: torch.Tensor | None
    match_signature: torch.Tensor | None = None
    """(N, L, E, D) the client's trained experts on the probe batch, for the matching (None:
    `signature` is that, or no matching)."""
    match_reference: torch.Tensor | None = None
    """(N, L, E, D) the experts of the global model each client started from, on the same probe
    batch, in the global numbering (None: match to the clients' centroid)."""

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int, dict]]) -> "ClientTable":
        ids, n, stats = stack_rows(rows)
        return cls(ids, n, stats["usage"], stats["load"], stats["tokens"], stats.get("signature"),
                   stats.get("match_signature"), stats.get("match_reference"))

    def renumbered(self, perms: torch.Tensor) -> "ClientTable":
        """Every per-expert statistic with client i's expert perms[i, l, e] moved to e."""
        def move(t):
            index = perms.reshape(*perms.shape, *([1] * (t.ndim - 3))).expand_as(t)
            return torch.gather(t, 2, index)

        return ClientTable(self.client_ids, self.n, move(self.usage), move(self.load), move(self.tokens),
                           None if self.signature is None else move(self.signature),
                           None if self.match_signature is None else move(self.match_signature),
                           self.match_reference)  # already in the global numbering


def stack_rows(rows: list[tuple[int, int, dict]]) -> tuple[list[int], torch.Tensor, dict[str, torch.Tensor]]:
    """Gathered (client id, examples, statistics) rows -> ids, examples and each statistic
    stacked over clients, in client-id order (the same on every rank); None values skipped."""
    rows = sorted(rows, key=lambda r: r[0])
    keys = [k for k, v in rows[0][2].items() if v is not None]
    return ([r[0] for r in rows], torch.tensor([float(r[1]) for r in rows]),
            {k: torch.stack([r[2][k] for r in rows]) for k in keys})


@dataclass
class AggregationPlan:
    weights: ExpertwiseWeights
    personal: torch.Tensor | None = None
    """(N, L, E) codes ALIGNED / OWN / PAIRWISE / INACTIVE; None: no personal experts."""
    gates: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    """(layer position, expert) -> (N, N) pairwise personalisation weights."""
    diagnostics: dict = field(default_factory=dict)


class ExpertwiseStrategy(Strategy):
    comm_path = "reduce"
    shares_statistics = True

    def __init__(self, config, anatomy=None, store=None):
        super().__init__(config, anatomy, store)
        self.layer_pos = {layer: i for i, layer in enumerate(anatomy.layers())} if anatomy is not None else {}

    @property
    def personal_kinds(self) -> tuple[str, ...]:
        """The parameter kinds (models/anatomy.py) a personal expert is made of."""
        return ("expert", "expert_lora_A", "expert_lora_B")

    def make_table(self, rows: list[tuple[int, int, dict]]):
        """The gathered (client id, examples, statistics) rows as tensors, in client-id order."""
        return ClientTable.from_rows(rows)

    def renumbering(self, table: ClientTable) -> torch.Tensor | None:
        """(N, L, E) per client: its expert perms[i, l, e] takes part as expert e (alignment by
        matching); None: every client's numbering is kept."""
        return None

    @abstractmethod
    def plan(self, table: ClientTable) -> AggregationPlan:
        """Aggregation weights (and personal-expert decisions) from the statistics alone."""

    # -- client side -------------------------------------------------------------------
    def client_statistics(self, module, client):
        """The routing statistics of stats_request (clients/routing_stats.py)."""
        request = self.stats_request
        if request is None:
            return {}
        probe = probe_batch(client.vocab_size, self.config.seed) if request.signature == "probe" else None
        return routing_statistics(module, self.anatomy.family, self.anatomy.num_experts,
                                  client.batches(request.batches), request, client.device, probe)

    def client_start_state(self, client_id, global_state, store):
        personal = store.get(client_id, PERSONAL_KEY)
        if not personal:
            return global_state
        state = dict(global_state)
        for key, value in personal.items():
            name, expert = key.rsplit("|", 1)
            if state[name] is global_state[name]:
                state[name] = global_state[name].clone()
            self.anatomy.put_expert(name, state[name], int(expert), value)
        return state

    # -- coordinator side ----------------------------------------------------------------
    def aggregate(self, global_state: NamedTensors, updates: list[ClientUpdate], comm):
        table = self.make_table(self._gather_stats(updates, comm))
        row_of = {cid: i for i, cid in enumerate(table.client_ids)}
        with comm.all_ranks_agree("matching experts"):
            perms = self.renumbering(table)
        own_numbering, matched = updates, {}
        if perms is not None:
            perms = self._agree_on_renumbering(perms, comm)
            table = table.renumbered(perms)
            updates = [self._renumbered(u, perms[row_of[u.client_id]], global_state) for u in updates]
            matched = renumbering_diagnostics(perms, table.client_ids, self.anatomy.layers())
        with comm.all_ranks_agree("the aggregation plan"):
            plan = self.plan(table)
        self._agree_on_plan(plan, comm)
        self._last_weights = plan.weights
        if self.comm_path == "reduce":
            partial = weighted_delta_sum([u.delta for u in updates], [row_of[u.client_id] for u in updates],
                                         plan.weights, self.anatomy, self.layer_pos, like=global_state)
            new_state = apply_delta(global_state, comm.all_reduce_sum(partial))
            everyone = None
        else:
            everyone = self._gather_deltas(updates, global_state, comm)

            def combine():
                ids = sorted(everyone)
                total = weighted_delta_sum([everyone[c] for c in ids], [row_of[c] for c in ids], plan.weights,
                                           self.anatomy, self.layer_pos, like=global_state)
                return apply_delta(global_state, total)

            new_state = comm.on_coordinator("combining the gathered deltas", combine)
            if new_state is None:  # not the coordinator: a buffer for its result
                new_state = {n: t.clone() for n, t in global_state.items()}
            comm.broadcast_(new_state)
        if plan.personal is not None and self.store is not None:
            for update in (u for u in own_numbering if u.keeps_state):  # personal experts: own numbering
                row = row_of[update.client_id]
                self._keep_personal_experts(update, row, plan, global_state, everyone, row_of,
                                            None if perms is None else perms[row])
        return new_state, {**plan.diagnostics, **matched}

    def _renumbered(self, update: ClientUpdate, perm_LE: torch.Tensor, global_state: NamedTensors) -> ClientUpdate:
        """The update in the global numbering: global expert e (its weights or slice of a fused
        tensor, LoRA factors, router row and bias) receives the client's trained expert
        perm_LE[l, e] minus global expert e (aggregation/matching.py, aligned_delta), the
        parameters aligned, not the changes: delta = trained - global, so the trained expert is
        global + delta in the client's numbering. Moving the change of expert f from where it
        started is right only where experts f and e started equal (copies of an upcycled base).
        Under DP the delta leaves clipped; the renumbered one is the permuted clipped delta (the
        same norm) plus global[f] - global[e], a function of the renumbering (from the noised
        statistics) and the public global model alone, so no client moves the sum by more than
        its weight times C. Personal experts stay in the client's own numbering (own_delta
        is not moved)."""
        layers = self.anatomy.layers()
        moving = {layer: perm_LE[li] for li, layer in enumerate(layers)
                  if not torch.equal(perm_LE[li], torch.arange(perm_LE.shape[1]))}
        if not moving:
            return update
        return dataclasses.replace(update, delta=aligned_delta(update.delta, global_state, self.anatomy, moving))

    @staticmethod
    def _agree_on_renumbering(perms: torch.Tensor, comm) -> torch.Tensor:
        """Rank 0's renumbering on every rank (a last-bit difference must not move an expert on
        one rank only)."""
        shared = {"perms": perms.double().contiguous()}
        comm.broadcast_(shared)
        return shared["perms"].long()

    def max_client_weight(self, global_state, comm):
        """From the last plan (the same on every rank): per parameter the largest weight over
        clients, per router row and per expert where the weights are."""
        w = self._last_weights
        largest = ExpertwiseWeights(other=w.other.max(0, keepdim=True).values,
                                    router=w.router.max(0, keepdim=True).values,
                                    expert=w.expert.max(0, keepdim=True).values)
        return {name: client_weight(self.anatomy, self.layer_pos, largest, 0, name, t.ndim)
                for name, t in global_state.items()}

    @staticmethod
    def _gather_stats(updates: list[ClientUpdate], comm) -> list[tuple[int, int, dict]]:
        """Every sampled client's (id, examples, statistics), gathered as tensors."""
        items = [{"client_id": torch.tensor(u.client_id), "num_examples": torch.tensor(u.num_examples),
                  **{k: v for k, v in u.stats.items() if v is not None}} for u in updates]
        return [(int(item.pop("client_id")), int(item.pop("num_examples")), item)
                for part in comm.all_gather_client_items(items) for item in part]

    def synced_state(self) -> NamedTensors:
        """Strategy state that the plan sets and every rank uses (FedAlign: the routing prior)."""
        return {}

    def _agree_on_plan(self, plan: AggregationPlan, comm) -> None:
        """Every rank applies rank 0's plan bit for bit: computed apart, a last-bit difference
        (another CPU, another BLAS) could flip a threshold decision on one rank only."""
        def own(t):  # a private contiguous copy (weights may be expanded views) to receive into
            return t.clone(memory_format=torch.contiguous_format)

        w = plan.weights
        shared = {"other": own(w.other), "router": own(w.router), "expert": own(w.expert),
                  **{f"gate_{li}_{e}": own(gate) for (li, e), gate in plan.gates.items()},
                  **{f"state_{k}": v for k, v in self.synced_state().items()}}  # updated in place
        if plan.personal is not None:
            shared["personal"] = plan.personal.double()
        comm.broadcast_(shared)
        plan.weights = ExpertwiseWeights(shared["other"], shared["router"], shared["expert"])
        plan.gates = {(li, e): shared[f"gate_{li}_{e}"] for li, e in plan.gates}
        if plan.personal is not None:
            plan.personal = shared["personal"].to(plan.personal.dtype)

    @staticmethod
    def _gather_deltas(updates, like, comm) -> dict[int, NamedTensors]:
        rows = (torch.stack([flatten({n: u.delta[n] for n in like}) for u in updates]) if updates  # in like's order
                else torch.zeros(0, len(flatten(like))))
        ids = comm.all_gather_json([u.client_id for u in updates])
        blocks = comm.all_gather_rows(rows)
        return {cid: unflatten(row, like) for part_ids, block in zip(ids, blocks)
                for cid, row in zip(part_ids, block)}

    def _keep_personal_experts(self, update: ClientUpdate, row: int, plan: AggregationPlan,
                               start_global: NamedTensors, everyone, row_of, perm_LE=None) -> None:
        """A client outside the aligned set keeps its expert (and, where personal_kinds says so,
        its router row); aligned again, it drops it. The plan speaks of global expert `slot`,
        which was the client's expert perm_LE[l, slot] (matching; None: the same number):
        personal experts are kept in the client's own numbering."""
        personal = self.store.get(update.client_id, PERSONAL_KEY) or {}
        own = update.own_delta if update.own_delta is not None else update.delta  # DP clips only what leaves
        for name in self.anatomy.names_of(*self.personal_kinds, among=update.delta):
            li = self.layer_pos[self.anatomy.role(name).layer]
            for slot in range(self.anatomy.num_experts):
                e = slot if perm_LE is None else int(perm_LE[li, slot])
                key, code = f"{name}|{e}", int(plan.personal[row, li, slot])
                if code == ALIGNED:
                    personal.pop(key, None)
                    continue
                if code == INACTIVE and key not in personal:
                    continue
                if code == PAIRWISE:
                    gate = plan.gates[(li, slot)][row]  # pairwise mode is never matched (config)
                    mixed = sum(float(gate[row_of[c]]) * self.anatomy.expert_slice(name, d[name], e)
                                for c, d in everyone.items() if gate[row_of[c]] > 0)
                    value = self.anatomy.expert_slice(name, start_global[name], e).float() + mixed
                else:  # OWN, or INACTIVE with a copy: its trained expert = global + delta
                    value = (self.anatomy.expert_slice(name, start_global[name], e).float()
                             + self.anatomy.expert_slice(name, own[name], e))
                personal[key] = value.clone()
        if personal:
            self.store.put(update.client_id, PERSONAL_KEY, personal)
        else:
            self.store.drop(update.client_id, PERSONAL_KEY)
