"""Failing together: after a block that may raise on some ranks only (rank-0-only I/O, the RSEA
solve, a check), every rank learns whether any rank failed, so no rank is left waiting in
the next collective until the timeout. One process: pass-through.

    with all_ranks_agree("checkpoint commit"):
        if rank == 0:
            commit()          # may raise on rank 0 only

The failing rank re-raises its own exception (its traceback is the one the user needs); the
others raise PeerFailure, which the command line reports in one line.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """Another rank failed; this rank stops too (the failing rank shows the traceback)."""


def status_device() -> torch.device:
    """NCCL moves CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def failed_ranks(failed: bool) -> list[int]:
    """Every rank's flag, exchanged (one tiny all_gather): the ranks that failed."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [0] if failed else []
    flag = torch.tensor([int(failed)], dtype=torch.int32, device=status_device())
    flags = [torch.empty_like(flag) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, flag)
    return [rank for rank, f in enumerate(flags) if int(f.item())]


@contextmanager
def all_ranks_agree(what: str):
    """Run the block on every rank (ranks may skip its contents), then exchange a status.
    The block must contain no collective: a rank that failed before it would leave the
    others waiting there."""
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
        error = err
    failed = failed_ranks(error is not None)
    if error is not None:
        raise error
    if failed:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise PeerFailure(f"rank {', '.join(map(str, failed))} failed during {what}; rank {rank} stops too "
                          f"(the failing rank's output says why)")


def on_coordinator(what: str, fn, *args, coordinator: bool | None = None, **kwargs):
    """fn(*args, **kwargs) on the coordinator only (rank 0 unless `coordinator` says whether
    this rank is one; its result there, None elsewhere); every rank fails together if it raised."""
    result = None
    if coordinator is None:
        coordinator = not dist.is_initialized() or dist.get_rank() == 0
    with all_ranks_agree(what):
        if coordinator:
            result = fn(*args, **kwargs)
    return result


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes, bytes): equal digests, equal states."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check_identical_on_all_ranks(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise on every rank unless every rank holds bit-identical `state`."""
    from fedalign_dist.distributed.collectives import all_gather_json
    digests = all_gather_json(state_digest(state))
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks hold different {what} (" + ", ".join(
            f"rank {r}: {d[:12]}" for r, d in enumerate(digests)) + ")")
