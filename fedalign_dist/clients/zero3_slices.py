"""Moving a state in and out of a client group's ZeRO-3 slices when the state itself is kept by
shard (aggregation/shards.py: each tensor held whole by one rank of the group, its owner).

Loading: the owner cuts each tensor into the group's slices and scatters them, so a rank
receives only its slice. Reading: every rank sends its fp32 slice to the tensor's owner, which
alone assembles the whole tensor. One tensor at a time: no rank ever holds the whole model."""
from __future__ import annotations

import torch

from fedalign_dist.distributed.collectives import gather_to, scatter_to


def slice_of(full: torch.Tensor, param, group_rank: int) -> torch.Tensor:
    """`group_rank`'s ZeRO-3 slice of a full tensor: the flat elements [r*n, (r+1)*n), zero
    past the end (the last slice is padded)."""
    n = param.ds_tensor.numel()
    flat = full.reshape(-1)
    start = min(group_rank * n, flat.numel())
    piece = flat[start:start + n]
    return torch.cat([piece, piece.new_zeros(n - piece.numel())]) if piece.numel() < n else piece


def scatter_from_owners(params: dict, state: dict, owner: dict[str, int], group, device: torch.device,
                        counter=None):
    """(name, parameter, this rank's fp32 slice of state[name]) for every parameter, each slice
    scattered by the tensor's owner; `state` holds this rank's own tensors only. `counter`
    (a ByteCounter) counts the bytes this rank sends."""
    me, ranks = group.group_rank, group.get_data_parallel_group_ranks()
    wire = device if device.type == "cuda" else torch.device("cpu")
    for name, param in params.items():
        mine = torch.empty(param.ds_tensor.numel(), dtype=torch.float32, device=wire)
        pieces = None
        if owner[name] == me:
            full = state[name].float()
            pieces = [slice_of(full, param, r).to(wire).contiguous() for r in range(group.size)]
            if counter is not None:
                counter.sent += (group.size - 1) * mine.numel() * 4
        scatter_to(mine, pieces, ranks[owner[name]], group.get_data_parallel_group())
        yield name, param, mine


def gather_to_owners(params: dict, local_slice, owner: dict[str, int], group, device: torch.device,
                     counter=None) -> dict:
    """{name: whole fp32 tensor (CPU)} for the parameters this rank owns; `local_slice(param)`
    is this rank's fp32 slice, sent to the owner of each parameter (bytes sent: `counter`)."""
    me, ranks = group.group_rank, group.get_data_parallel_group_ranks()
    wire = device if device.type == "cuda" else torch.device("cpu")
    out = {}
    for name, param in params.items():
        mine = local_slice(param).detach().float().reshape(-1).to(wire).contiguous()
        bucket = [torch.empty_like(mine) for _ in range(group.size)] if owner[name] == me else None
        gather_to(mine, bucket, ranks[owner[name]], group.get_data_parallel_group())
        if bucket is not None:
            out[name] = torch.cat(bucket)[:param.ds_numel].view(param.ds_shape).cpu().clone()
        elif counter is not None:
            counter.sent += mine.numel() * 4
    return out
