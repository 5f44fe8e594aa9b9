"""FedMoE-style modular averaging (baseline): expert e averaged only over the clients that
routed tokens to it, weighted by those token counts; routers and everything else by examples."""
from __future__ import annotations

from pydantic import Field

from fedalign_dist.aggregation.alignment import token_weights
from fedalign_dist.aggregation.expert_weights import ExpertwiseWeights
from fedalign_dist.clients.routing_stats import StatsRequest
from fedalign_dist.config_sections import ConfigSection
from fedalign_dist.strategies.base import register
from fedalign_dist.strategies.expertwise import AggregationPlan, ClientTable, ExpertwiseStrategy


class FedMoEConfig(ConfigSection):
    stats_batches: int = Field(2, ge=1)
    """Local batches over which routed-token counts are measured after training."""


@register("fedmoe")
class FedMoE(ExpertwiseStrategy):
    config_section = FedMoEConfig
    model_kind = "moe"
    runs_under_client_groups = True
    @property
    def stats_request(self):
        return StatsRequest(batches=self.config.strategy.fedmoe.stats_batches)

    def plan(self, table: ClientTable) -> AggregationPlan:
        by_examples = table.n / table.n.sum()
        weights = ExpertwiseWeights(other=by_examples,
                                    router=by_examples[:, None, None].expand_as(table.usage),
                                    expert=token_weights(table.tokens))
        return AggregationPlan(weights)
