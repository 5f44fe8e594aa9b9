"""Fault injection for the test suite, not a user setting: the environment variable
FEDALIGN_DIST_FAULT holds comma-separated faults, each active on one rank (default 0):

    rsea_solve[@RANK]          raise inside FedAMoLE's reverse-selection solve
    checkpoint_commit[@RANK]   raise inside the checkpoint commit
    final_export_part[@RANK]   raise while a client group's rank writes its part of final/
    local_training[@RANK]      raise in a client's local training
    diverge_client=ID          train client ID with a learning rate of 1e20 (a real divergence)
    huge_delta_client=ID       replace client ID's update by finite values of 1e38 (an overflow)

Without the variable every call here is a no-op."""
from __future__ import annotations

import os
import sys
import time

VARIABLE = "FEDALIGN_DIST_FAULT"


def _faults() -> list[str]:
    return [f.strip() for f in os.environ.get(VARIABLE, "").split(",") if f.strip()]


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def maybe_raise(point: str) -> None:
    """Raise at `point` if a fault names it (for this rank)."""
    for fault in _faults():
        name, _, rank = fault.partition("@")
        if name == point and int(rank or 0) == _rank():
            print(f"injected fault at {point} on rank {_rank()} (t={time.time():.3f})", file=sys.stderr, flush=True)
            raise RuntimeError(f"injected fault: {point}")


def client_fault(kind: str, client_id: int) -> bool:
    """Whether `kind=client_id` is among the faults."""
    return f"{kind}={client_id}" in _faults()
