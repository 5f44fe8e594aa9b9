"""A DeepSpeed `mpu` that makes every rank its own one-rank data- and model-parallel job.

Plain deepspeed.initialize treats all ranks as one data-parallel job (gradients all-reduced,
rank 0's weights broadcast). Federated clients must stay independent, so each rank gets a
process group containing only itself. torch.distributed requires every rank to create every
group, in the same order."""
from __future__ import annotations

import torch.distributed as dist


class SoloMPU:
    def __init__(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        groups = [dist.new_group([r]) for r in range(world)]
        self._group, self._rank = groups[rank], rank

    def get_data_parallel_group(self):
        return self._group

    def get_model_parallel_group(self):
        return self._group

    def get_tensor_model_parallel_group(self):
        return self._group

    def get_data_parallel_rank(self):
        return 0

    def get_model_parallel_rank(self):
        return 0

    def get_tensor_model_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return 1

    def get_model_parallel_world_size(self):
        return 1

    def get_tensor_model_parallel_world_size(self):
        return 1

    def get_data_parallel_group_ranks(self):
        return [self._rank]

    def get_tensor_model_parallel_src_rank(self):
        return self._rank
