"""FedAvg: every federated parameter averaged by examples (McMahan et al., 2017)."""
from __future__ import annotations

from fedalign_dist.aggregation.weighted import DENOMINATOR_KEY, apply_delta, finish_weighted_mean, weighted_partial_sum
from fedalign_dist.strategies.base import ClientUpdate, NamedTensors, Strategy, register


@register("fedavg")
class FedAvg(Strategy):
    runs_under_client_groups = True  # FedProx too

    def aggregate(self, global_state: NamedTensors, updates: list[ClientUpdate], comm):
        # Pre-sum this rank's clients, then one all_reduce for numerators and denominator.
        partial = weighted_partial_sum([u.delta for u in updates], [u.num_examples for u in updates],
                                       like=global_state)
        summed = comm.all_reduce_sum(partial)
        self._weights = (max((u.num_examples for u in updates), default=0), float(summed[DENOMINATOR_KEY]))
        return apply_delta(global_state, finish_weighted_mean(summed)), {}

    def max_client_weight(self, global_state, comm):
        """max_i n_i / sum_i n_i over every rank's clients (1 / clients when all weigh 1, as under DP)."""
        largest, total = self._weights
        largest = max(comm.all_gather_json(largest))
        return {name: largest / total for name in global_state}
