"""Gaussian noise that every rank draws identically: a generator seeded by (secret, round,
stream, index or tensor name), so the aggregate gets ONE draw whatever the number of ranks,
resumes reproduce it, and nobody without the secret can subtract it."""
from __future__ import annotations

import numpy as np
import torch

# streams: independent draws of one round
MODEL, STATISTICS, COUNT = 1, 2, 3


def generator(secret: int, round_idx: int, stream: int, index: int = 0) -> torch.Generator:
    seed = int(np.random.SeedSequence([secret, round_idx, stream, index]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed >> 1)


def tensor_generator(secret: int, round_idx: int, name: str) -> torch.Generator:
    """The MODEL stream's generator for one named tensor: the same draw whichever rank holds the
    tensor and whatever else it holds (client groups keep the state by shard)."""
    seed = int(np.random.SeedSequence([secret, round_idx, MODEL, *name.encode()]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed >> 1)


def gaussian_like(like: dict[str, torch.Tensor], std: dict[str, torch.Tensor | float],
                  generator_of) -> dict[str, torch.Tensor]:
    """N(0, std^2) per element (float32), `std` broadcastable to each tensor, tensor `name`
    drawn from `generator_of(name)`."""
    return {name: torch.randn(ref.shape, generator=generator_of(name), dtype=torch.float32) * std[name]
            for name, ref in like.items()}
