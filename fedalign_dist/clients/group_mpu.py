"""A DeepSpeed `mpu` that splits the world into client groups of `size` consecutive ranks.

Plain deepspeed.initialize treats all ranks as one data-parallel job (gradients all-reduced,
rank 0's weights broadcast). Federated clients must stay independent: a group's engine sees
only its own ranks as its data-parallel job. Size 1 (the default) makes every rank its own
one-rank job; a larger group trains one client at a time with the model sharded over its
ranks by ZeRO-3 (issue 28), and the aggregation is split by shard over the process groups of
"rank i of every group". Model and tensor parallelism are this rank alone. torch.distributed
requires every rank to create every group, in the same order."""
from __future__ import annotations

import torch.distributed as dist


class GroupMPU:
    def __init__(self, size: int = 1):
        rank, world = dist.get_rank(), dist.get_world_size()
        if size < 1 or world % size:
            raise ValueError(f"client groups of {size} rank(s) do not divide a world of {world} ranks")
        singles = [dist.new_group([r]) for r in range(world)]
        groups = singles if size == 1 else [dist.new_group(list(range(first, first + size)))
                                            for first in range(0, world, size)]
        self.size, self.rank = size, rank
        self.index, self.group_rank = divmod(rank, size)
        self._single, self._group = singles[rank], groups[self.index]
        # "rank i of every client group": the aggregation of shard i runs over it
        self.shard_ranks = list(range(self.group_rank, world, size))
        shards = [dist.new_group(list(range(i, world, size))) for i in range(size)] if size > 1 else [None]
        self.shard_group = shards[self.group_rank]

    def get_data_parallel_group(self):
        return self._group

    def get_model_parallel_group(self):
        return self._single

    def get_tensor_model_parallel_group(self):
        return self._single

    def get_data_parallel_rank(self):
        return self.group_rank

    def get_model_parallel_rank(self):
        return 0

    def get_tensor_model_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return self.size

    def get_model_parallel_world_size(self):
        return 1

    def get_tensor_model_parallel_world_size(self):
        return 1

    def get_data_parallel_group_ranks(self):
        first = self.index * self.size
        return list(range(first, first + self.size))

    def get_tensor_model_parallel_src_rank(self):
        return self.rank
