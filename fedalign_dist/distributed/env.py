"""Process-group start-up for torchrun, accelerate launch, srun, or a single plain process."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fedalign_dist.distributed.rank_exit import end_rank


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0


def _from_slurm() -> None:
    """Plain `srun` (one task per rank): translate SLURM's variables into torchrun's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("srun mode needs MASTER_ADDR (the first host of the allocation); see slurm/")


def resolve_backend(backend: str) -> str:
    """dist.backend=auto: NCCL where CUDA is, gloo elsewhere."""
    return ("nccl" if torch.cuda.is_available() else "gloo") if backend == "auto" else backend


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join (or create) the process group. A plain `python -m` start is a world of one.
    timeout_s bounds every collective (dist.timeout_s): a rank that hangs fails the job then."""
    _from_slurm()
    alone = "RANK" not in os.environ  # a plain process (a script, a notebook): a world of one
    rank, world = (0, 1) if alone else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    local_rank = 0 if alone else int(os.environ.get("LOCAL_RANK", 0))
    backend = resolve_backend(backend)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("dist.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
        visible = torch.cuda.device_count()
        if local_rank >= visible:  # NCCL cannot put two ranks on one GPU
            raise RuntimeError(f"rank {rank} is local rank {local_rank} but this node has {visible} GPU(s): "
                               f"start at most {visible} processes per node (--nproc-per-node {visible}), "
                               f"or dist.backend=gloo to run on CPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # alone: an in-memory store, so nothing is written to os.environ and no port is taken
        store = dist.HashStore() if alone else _restart_store(rank, world, timeout)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, store=store)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)


def _restart_store(rank: int, world: int, timeout) -> "dist.Store | None":
    """After a torchrun restart the agent's store still holds the dead workers' gloo
    addresses under the same keys (seen with torch 2.13): the new workers would connect to
    them. A prefix per restart attempt keeps the generations apart. None: the default."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=not agent_hosts and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"/fedalign_dist/attempt_{attempt}", base)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def end_checked_rank() -> None:
    """The end of a multi-rank script whose checks passed: wait for every rank, then exit 0
    without interpreter finalization (see end_rank)."""
    if dist.is_initialized():
        dist.barrier()
    shutdown()
    end_rank(0)
