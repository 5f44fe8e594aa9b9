"""Do the experts have roles? Per MoE layer, over held-out tokens: how evenly the top-k slots
are spread (load entropy over log E: 1 = uniform use of every expert), and how much the top-1
expert says about the token's kind and about the document's source (mutual information
over the entropy of the kind or source: 0 = routing ignores it, 1 = routing determines it)."""
from __future__ import annotations

import math

import torch

KINDS = ("word start", "word piece", "digits", "punctuation", "other")


def token_kind(piece: str) -> int:
    """The kind of a byte-level BPE token ('Ġ' marks a leading space)."""
    core = piece.lstrip("Ġ")
    if core.isalpha():
        return 0 if piece.startswith("Ġ") else 1
    if core.isdigit():
        return 2
    if core and all(not c.isalnum() for c in core):
        return 3
    return 4


def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def normalised_information(counts: torch.Tensor) -> float:
    """I(X; Y) / H(Y) of a contingency table counts[x, y] (0 where H(Y) = 0)."""
    joint = counts.double() / counts.sum()
    hy = entropy(joint.sum(0))
    if hy == 0:
        return 0.0
    mi = entropy(joint.sum(1)) + hy - entropy(joint.flatten())
    return mi / hy


@torch.no_grad()
def expert_roles(model, sequences: torch.Tensor, sources: torch.Tensor, kinds: torch.Tensor, num_sources: int,
                 batch_size: int = 32) -> list[dict]:
    """Per MoE layer: load_entropy, kind_information, source_information (see above)."""
    model.eval()
    experts, top_k = model.config.num_local_experts, model.config.num_experts_per_tok
    load, by_kind, by_source = None, None, None
    for start in range(0, len(sequences), batch_size):
        out = model(input_ids=sequences[start:start + batch_size], output_router_logits=True)
        logits = out.router_logits
        if load is None:
            load = torch.zeros(len(logits), experts)
            by_kind = torch.zeros(len(logits), experts, len(KINDS))
            by_source = torch.zeros(len(logits), experts, num_sources)
        kind = kinds[start:start + batch_size].reshape(-1)
        source = sources[start:start + batch_size].reshape(-1)
        for li, layer_logits in enumerate(logits):
            top = layer_logits.topk(top_k, -1).indices
            load[li] += torch.bincount(top.reshape(-1), minlength=experts).float()
            first = top[:, 0]
            by_kind[li].index_put_((first, kind), torch.ones_like(first, dtype=torch.float), accumulate=True)
            by_source[li].index_put_((first, source), torch.ones_like(first, dtype=torch.float), accumulate=True)
    return [{"load_entropy": entropy(load[li] / load[li].sum()) / math.log(experts),
             "kind_information": normalised_information(by_kind[li]),
             "source_information": normalised_information(by_source[li])} for li in range(len(load))]
