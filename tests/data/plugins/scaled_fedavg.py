"""A strategy from outside the package, as a user writes one: FedAvg with a server learning
rate (new = global + server_lr * weighted mean of the deltas), with its own config section
`strategy.scaled_fedavg`. Loaded with --import scaled_fedavg (its folder on PYTHONPATH)."""
from pydantic import Field

from fedalign_dist.aggregation.weighted import apply_delta, finish_weighted_mean, weighted_partial_sum
from fedalign_dist.config import ConfigSection
from fedalign_dist.strategies import Strategy, register


class ScaledFedAvgConfig(ConfigSection):
    server_lr: float = Field(1.0, ge=0)
    """Step size of the server's update along the clients' mean delta."""


@register("scaled_fedavg")
class ScaledFedAvg(Strategy):
    config_section = ScaledFedAvgConfig

    def aggregate(self, global_state, updates, comm):
        partial = weighted_partial_sum([u.delta for u in updates], [u.num_examples for u in updates],
                                       like=global_state)
        mean = finish_weighted_mean(comm.all_reduce_sum(partial))
        step = self.config.strategy.scaled_fedavg.server_lr
        return apply_delta(global_state, {n: step * d for n, d in mean.items()}), {"server_lr": step}
