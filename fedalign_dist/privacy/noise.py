"""Gaussian noise that every rank draws identically: a generator seeded by (secret, round,
stream, index), so the aggregate gets ONE draw whatever the number of ranks, resumes
reproduce it, and nobody without the secret can subtract it."""
from __future__ import annotations

import numpy as np
import torch

# streams: independent draws of one round
MODEL, STATISTICS, COUNT = 1, 2, 3


def generator(secret: int, round_idx: int, stream: int, index: int = 0) -> torch.Generator:
    seed = int(np.random.SeedSequence([secret, round_idx, stream, index]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed >> 1)


def gaussian_like(like: dict[str, torch.Tensor], std: dict[str, torch.Tensor | float],
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    """N(0, std^2) per element (float32), `std` broadcastable to each tensor; drawn in the
    order of `like`, so the same names in the same order give the same noise."""
    return {name: torch.randn(ref.shape, generator=gen, dtype=torch.float32) * std[name]
            for name, ref in like.items()}
