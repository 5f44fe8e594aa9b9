"""The Communicator a strategy receives: named-tensor collectives plus byte accounting.

By default its collectives span the world. Under client groups the aggregation runs once per
shard, over the process group of "rank i of every client group" (`group`, whose world ranks
are `ranks`): there the coordinator is the shard group's first rank, and `src` in broadcast_
counts within the group."""
from __future__ import annotations

import torch

from fedalign_dist.distributed import agreement, collectives


class Communicator:
    def __init__(self, rank: int, world_size: int, device: torch.device, group=None,
                 ranks: list[int] | None = None, counter: collectives.ByteCounter | None = None):
        self.rank, self.device, self.group = rank, device, group
        self.ranks = list(ranks) if ranks is not None else list(range(world_size))
        self.world_size = len(self.ranks)
        self.bytes = counter if counter is not None else collectives.ByteCounter()

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.ranks[0]

    def all_reduce_sum(self, tensors):
        return collectives.all_reduce_sum(tensors, self.bytes, self._wire_device(), self.group)

    def broadcast_(self, tensors, src: int = 0):
        collectives.broadcast_(tensors, self.bytes, self.ranks[src], self._wire_device(), self.group)

    def all_gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return collectives.all_gather_rows(rows, self.bytes, self._wire_device(), self.group)

    def all_gather_json(self, obj):
        return collectives.all_gather_json(obj, self.bytes, self._wire_device(), self.group)

    def all_gather_tensor_items(self, items):
        return collectives.all_gather_tensor_items(items, self.bytes, self._wire_device(), self.group)

    def sum_over_shards(self, values: list[float]) -> list[float]:
        """Element-wise sums of `values` computed on each shard of the global state (client
        groups, distributed/sharded_aggregation.py) into the whole state's; the state is whole here."""
        return list(values)

    def all_gather_client_items(self, items):
        """Per-client items that every rank of a client group holds alike (routing statistics),
        per host in rank order: as all_gather_tensor_items, except that under client groups
        they are gathered once, not once per shard (see distributed/sharded_aggregation.py)."""
        return self.all_gather_tensor_items(items)

    def on_coordinator(self, what: str, fn, *args, **kwargs):
        """fn on this communicator's coordinator only; every rank of the world fails together if
        it raised (see distributed/agreement.py)."""
        return agreement.on_coordinator(what, fn, *args, coordinator=self.is_coordinator, **kwargs)

    def all_ranks_agree(self, what: str):
        return agreement.all_ranks_agree(what)

    def _wire_device(self):
        # NCCL moves CUDA tensors only; gloo works on CPU tensors.
        return self.device if self.device.type == "cuda" else None
