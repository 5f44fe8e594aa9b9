"""FedAvg: every federated parameter averaged by examples (McMahan et al., 2017)."""
from __future__ import annotations

from fedalign_dist.aggregation.weighted import apply_delta, finish_weighted_mean, weighted_partial_sum
from fedalign_dist.strategies.base import ClientUpdate, NamedTensors, Strategy, register


@register("fedavg")
class FedAvg(Strategy):
    def aggregate(self, global_state: NamedTensors, updates: list[ClientUpdate], comm):
        # Pre-sum this rank's clients, then one all_reduce for numerators and denominator.
        partial = weighted_partial_sum([u.delta for u in updates], [u.num_examples for u in updates],
                                       like=global_state)
        mean_delta = finish_weighted_mean(comm.all_reduce_sum(partial))
        return apply_delta(global_state, mean_delta), {}
