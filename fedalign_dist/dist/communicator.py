"""The Communicator a strategy receives: named-tensor collectives plus byte accounting."""
from __future__ import annotations

import torch

from fedalign_dist.dist import agreement, collectives


class Communicator:
    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.bytes = collectives.ByteCounter()

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensors):
        return collectives.all_reduce_sum(tensors, self.bytes, self._wire_device())

    def broadcast_(self, tensors, src: int = 0):
        collectives.broadcast_(tensors, self.bytes, src, self._wire_device())

    def all_gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return collectives.all_gather_rows(rows, self.bytes, self._wire_device())

    def all_gather_json(self, obj):
        return collectives.all_gather_json(obj, self.bytes, self._wire_device())

    def all_gather_tensor_items(self, items):
        return collectives.all_gather_tensor_items(items, self.bytes, self._wire_device())

    def on_coordinator(self, what: str, fn, *args, **kwargs):
        """fn on rank 0 only; every rank fails together if it raised (see dist/agreement.py)."""
        return agreement.on_coordinator(what, fn, *args, **kwargs)

    def all_ranks_agree(self, what: str):
        return agreement.all_ranks_agree(what)

    def _wire_device(self):
        # NCCL moves CUDA tensors only; gloo works on CPU tensors.
        return self.device if self.device.type == "cuda" else None
