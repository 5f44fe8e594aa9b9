"""What a strategy's client-side phases may use about the client being trained this round."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch


@dataclass
class ClientContext:
    client_id: int
    round_idx: int
    data: "object"
    """The federated data set (fedalign_dist.data.federated.FederatedData)."""
    device: torch.device
    vocab_size: int
    """The tokenizer's vocabulary size (ids a real prompt can hold)."""
    batch_size: int
    batches: Callable[[int], Iterator[dict]]
    """batches(n): the client's first n seeded training batches of this round."""

    def batches_of(self, indices: Sequence[int]) -> Iterator[dict]:
        """Training batches (the task's input and target) of the given examples, in order."""
        for start in range(0, len(indices), self.batch_size):
            yield self.data.task.train_batch(self.data.examples_at(indices[start:start + self.batch_size]))
