"""Per-rank bytes of a client's training state under client groups (fed.ranks_per_client=G):
parameters, fp32 master weights, gradients and AdamW moments, measured from the tensors each
rank holds after one local step, for every G that divides the world; and seconds per local
step. Run under torchrun:

    python -m torch.distributed.run --nproc-per-node=4 bench/client_groups_memory.py \
        [--preset small] [--vocab byte|gpt2] [--steps 3] [--groups 1,2,4] [--bf16]   # ~1 min on 2 cores

--budget-mib B gives each rank B MiB beyond what it holds before the model is built (an
address-space limit on its heap, RLIMIT_DATA, standing in for a device's memory): a rank that
fails to allocate prints "OUT OF BUDGET" and the launch ends with exit code 3
(bench/client_groups_budget.py runs one launch per G that way).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedalign_dist.clients.group_mpu import GroupMPU  # noqa: E402
from fedalign_dist.clients.trainer import LocalTrainer, client_batches  # noqa: E402
from fedalign_dist.config import load_config  # noqa: E402
from fedalign_dist.data.federated import build_federated_data  # noqa: E402
from fedalign_dist.data.tokenizer import build_tokenizer  # noqa: E402
from fedalign_dist.distributed.env import end_checked_rank, init_distributed  # noqa: E402
from fedalign_dist.models.build import build_model  # noqa: E402
from fedalign_dist.train import quiet_libraries  # noqa: E402


def held_bytes(trainer: LocalTrainer) -> dict[str, int]:
    """What this rank holds: parameters (a ZeRO-3 slice or whole), fp32 masters (ZeRO-3 keeps a
    copy beside the parameters), gradients (after backward, before the step), AdamW moments."""
    from deepspeed.utils import safe_get_local_grad
    params = list(trainer.params.values())
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    out = {"parameters": sum(size(p.ds_tensor) if hasattr(p, "ds_tensor") else size(p) for p in params)}
    opt = trainer.engine.optimizer
    # ZeRO-3's flat fp32 slices; under bf16 on one rank, DeepSpeed's fp32 copy of every parameter
    masters = getattr(opt, "fp32_partitioned_groups_flat", None) or [t for group in getattr(opt, "fp32_groups", [])
                                                                     for t in group]
    # a master slice that is the parameters' own slice (fp32 ZeRO-3, trainer.share_fp32_masters) adds nothing
    shared = {p.ds_tensor.untyped_storage().data_ptr() for p in params if hasattr(p, "ds_tensor")}
    out["fp32 masters"] = sum(size(t) for t in masters if t.untyped_storage().data_ptr() not in shared)
    out["gradients"] = sum(size(safe_get_local_grad(p)) if trainer.sharded else size(p.grad) for p in params
                           if trainer.sharded or p.grad is not None)
    return out


def measure(env, cfg, data, tok, group_size: int, steps: int) -> dict:
    trainer = LocalTrainer(build_model(cfg, tok)[0], cfg, env.device, group=GroupMPU(group_size))
    trainer.reset_optimizer()
    batches = list(client_batches(data, data.clients[0]["train"], steps + 1, cfg.local.batch_size, 0, 0, 0))
    loss = lambda m, b: (data.task.loss(m, b, 0.0),) * 2  # noqa: E731
    # one step by hand, to read the gradients before the optimizer frees them
    trainer.engine.train()
    first = {k: v[trainer.group.group_rank::group_size] for k, v in batches[0].items()}
    first["loss_denominator"] = torch.tensor(max(data.task.targets_in(batches[0]), 1) / group_size)
    trainer.engine.backward(data.task.loss(trainer.engine, first, 0.0))
    held = held_bytes(trainer)
    trainer.engine.step()
    inner = trainer._torch_optimizer()
    held["AdamW moments"] = sum(t.numel() * t.element_size() for s in inner.state.values()
                                for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    dist.barrier()
    start = time.perf_counter()
    trainer.train(batches[1:], loss, lambda p: None, data.task.targets_in)
    dist.barrier()
    held["s/step"] = (time.perf_counter() - start) / steps
    return held


def status_bytes(field: str) -> int:
    """A size from /proc/self/status: VmData (the heap RLIMIT_DATA limits), VmHWM (peak resident)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure_within(budget_mib: int | None, *args) -> dict:
    """`measure`, with this rank's heap limited to what it holds now plus the budget. A rank out
    of budget says so in one line and leaves at once: its partners would otherwise wait in a
    collective until the timeout (torchrun ends them when it leaves)."""
    if budget_mib is None:
        return measure(*args)
    resource.setrlimit(resource.RLIMIT_DATA, (status_bytes("VmData") + budget_mib * 2**20, resource.RLIM_INFINITY))
    try:
        return measure(*args)
    except (RuntimeError, MemoryError) as error:  # torch's allocator: "can't allocate memory"
        if "allocate" not in str(error) and not isinstance(error, MemoryError):
            raise
        print(f"OUT OF BUDGET rank {dist.get_rank()}: {str(error).splitlines()[0][:200]}", flush=True)
        os._exit(3)
    finally:  # the budget is the client's training; the report after it is the bench's own
        resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", default="byte", choices=["byte", "gpt2"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", default="1,2,4,8", help="group sizes to measure (those dividing the world)")
    parser.add_argument("--budget-mib", type=int, help="each rank's heap beyond its holdings before the model")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="deepspeed.bf16=true (bf16 parameters, fp32 masters)")
    args = parser.parse_args()
    quiet_libraries()
    env = init_distributed("gloo")
    cfg = load_config(None, [f"model.preset={args.preset}", f"data.tokenizer={args.vocab}", "data.max_examples=300",
                             "data.max_length=64", "fed.num_clients=2", "fed.clients_per_round=2",
                             "local.batch_size=8", "data.min_client_examples=5", "model.router_aux_loss_coef=0",
                             f"model.num_experts={args.experts}", f"deepspeed.bf16={str(args.bf16).lower()}"])
    tok = build_tokenizer(cfg.data.tokenizer)
    data = build_federated_data(cfg.data, 2, 0, tok)
    rows = {}
    wanted = [int(g) for g in args.groups.split(",")]
    for group_size in (g for g in wanted if env.world_size % g == 0 and g <= env.world_size):
        mine = measure_within(args.budget_mib, env, cfg, data, tok, group_size, args.steps)
        mine["peak resident"] = status_bytes("VmHWM")
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
        rows[group_size] = {k: max(r[k] for r in gathered) for k in mine}  # the fullest rank
    if env.rank == 0 and 1 not in rows:
        print(json.dumps({str(g): row for g, row in rows.items()}))  # one G per launch: no ratio to G=1's
    elif env.rank == 0:
        keys = ["parameters", "fp32 masters", "gradients", "AdamW moments"]
        base = sum(rows[1][k] for k in keys)
        precision = "bf16 (fp32 masters)" if args.bf16 else "fp32"
        print(f"preset {args.preset} ({args.vocab} vocabulary), {env.world_size} ranks, {precision}; bytes on the "
              f"fullest rank")
        print("| G | " + " | ".join(keys) + " | total | total x G / G=1's | s/step |")
        print("|---|" + "---|" * (len(keys) + 3))
        for g, row in rows.items():
            total = sum(row[k] for k in keys)
            print(f"| {g} | " + " | ".join(f"{row[k] / 2**20:.2f} MiB" for k in keys)
                  + f" | {total / 2**20:.2f} MiB | {total * g / base:.2f} | {row['s/step']:.3f} |")
        print(json.dumps({str(g): row for g, row in rows.items()}))


if __name__ == "__main__":
    main()
    end_checked_rank()  # not interpreter finalization, which can abort a finished rank
