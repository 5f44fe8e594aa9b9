"""FedAMoLE client characteristics after local training, on the auxiliary split: per adapted
layer, t_c = mean over tokens of W_t x and e_{i,c} = mean over tokens of A_i x for every
expert i the client holds."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from fedalign_dist.models.amole import EmbeddingCollector, amole_modules


@torch.no_grad()
def amole_embeddings(module: nn.Module, batches: Iterable[dict], device: torch.device) -> dict[str, torch.Tensor]:
    was_training = module.training
    module.eval()
    with EmbeddingCollector(module) as collector:
        for batch in batches:
            collector.set_mask(batch["attention_mask"])
            module(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   position_ids=batch["position_ids"].to(device), logits_to_keep=1)
        t, e = collector.results()
    module.train(was_training)
    held = torch.stack([m.held.cpu() for m in amole_modules(module).values()])
    return {"t": t, "e": e, "held": held}


def aux_indices(train_idx, fraction: float, at_most: int, seed: int, client_id: int):
    """The client's auxiliary split: a fixed seeded sample of its training examples."""
    import numpy as np
    size = min(at_most, max(1, int(np.ceil(fraction * len(train_idx)))))
    return np.sort(np.random.default_rng([seed, client_id, 0xA0C5]).choice(train_idx, size, replace=False))
