"""Aggregation split by shard under client groups (fed.ranks_per_client=G > 1).

Every rank of a group holds the same round results (all of them trained each client), so rank
i of each group aggregates shard i alone: the strategy runs unchanged on that shard's tensors,
over the process group of "rank i of every group", and sends 1/G of the state across groups.
The group's ranks then exchange their new shards so each holds the whole global state, which
evaluation, checkpoints and the next round's clients read. Bytes between groups are counted
in the round's comm counter, bytes within a group in `within_group`."""
from __future__ import annotations

import dataclasses
import json

import torch

from fedalign_dist.aggregation.shards import assign_shards, shard_of
from fedalign_dist.dist import collectives
from fedalign_dist.dist.communicator import Communicator


class ShardedAggregation:
    def __init__(self, like: dict[str, torch.Tensor], group, device: torch.device,
                 counter: collectives.ByteCounter):
        self.group, self.device = group, device
        self.owner = assign_shards({n: t.numel() for n, t in like.items()}, group.size)
        self.names = [shard_of(self.owner, part) for part in range(group.size)]
        self.mine = self.names[group.group_rank]
        self.comm = Communicator(group.rank, len(group.shard_ranks), device, group=group.shard_group,
                                 ranks=group.shard_ranks, counter=counter)
        self.client_group = group.get_data_parallel_group()
        self.within_group = collectives.ByteCounter()

    def aggregate(self, strategy, global_state: dict, updates: list) -> tuple[dict, dict]:
        """The strategy's aggregation of this rank's shard over the shard group, then the whole
        new state from the group's shards. Every shard group must reach the same plan (the same
        statistics, gathered in the same order): checked, since differing plans would each be
        applied to some tensors only."""
        shard = {n: global_state[n] for n in self.mine}
        mine = [self._restricted(u) for u in updates]
        new_shard, diagnostics = strategy.aggregate(shard, mine, self.comm)
        self._check_same_plan(diagnostics)
        return self._assemble(new_shard, global_state), diagnostics

    def _restricted(self, update):
        keep = lambda d: None if d is None else {n: d[n] for n in self.mine}  # noqa: E731
        return dataclasses.replace(update, delta=keep(update.delta), own_delta=keep(update.own_delta))

    def _assemble(self, new_shard: dict, like: dict) -> dict:
        """Every group rank's new shard, gathered within the group, in the state's order."""
        flat = collectives.flatten({n: new_shard[n].float() for n in self.mine})
        blocks = collectives.all_gather_rows(flat[:, None], self.within_group, self._wire(), self.client_group)
        out = {}
        for names, block in zip(self.names, blocks):
            out.update(collectives.unflatten(block.flatten(), {n: like[n] for n in names}))
        return {n: out[n].to(like[n].dtype).clone() for n in like}

    def _check_same_plan(self, diagnostics: dict) -> None:
        text = json.dumps(diagnostics, sort_keys=True, default=str)
        seen = collectives.all_gather_json(text, self.within_group, self._wire(), self.client_group)
        if len(set(seen)) > 1:
            raise RuntimeError("the shards of one aggregation reached different plans (their diagnostics differ: "
                               + " | ".join(seen) + "); run with fed.ranks_per_client=1 and report this")

    def _wire(self):
        return self.device if self.device.type == "cuda" else None
