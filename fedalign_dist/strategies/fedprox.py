"""FedProx: FedAvg plus (mu/2) ||theta - theta_global||^2 in the local loss (Li et al., 2020)."""
from __future__ import annotations

from pydantic import Field

from fedalign_dist.config_sections import ConfigSection
from fedalign_dist.strategies.base import NamedTensors, register
from fedalign_dist.strategies.fedavg import FedAvg


class FedProxConfig(ConfigSection):
    mu: float = Field(0.01, ge=0)


@register("fedprox")
class FedProx(FedAvg):
    config_section = FedProxConfig

    def local_regularizer(self, params, start_state: NamedTensors):
        mu = self.config.strategy.fedprox.mu
        if mu == 0:
            return None
        sq = sum(((p - start_state[n].to(p.device, p.dtype)) ** 2).sum() for n, p in params.items())
        return 0.5 * mu * sq
