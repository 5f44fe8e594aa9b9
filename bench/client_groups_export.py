"""Host memory of the final export under client groups (fed.ranks_per_client=G): each rank's
rise in resident memory while the first group writes final/ by part (the export runs use),
against the export before it (the whole state gathered on the run's first rank, which then
saved global.safetensors and the Hugging Face model from it), on the same trained-from-start
model and the same global state; both exports reload equal. Run under torchrun:

    python -m torch.distributed.run --nproc-per-node=4 bench/client_groups_export.py \
        [--preset medium] [--groups 2,4]      # ~2 min on 2 cores

The rise is VmHWM (peak resident) after the export minus VmRSS before it, with the peak reset
first (/proc/self/clear_refs): bytes the export itself added, on the fullest rank.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.client_groups_memory import status_bytes  # noqa: E402
from fedalign_dist.clients.group_mpu import GroupMPU  # noqa: E402
from fedalign_dist.clients.trainer import LocalTrainer  # noqa: E402
from fedalign_dist.config import load_config  # noqa: E402
from fedalign_dist.data.tokenizer import build_tokenizer  # noqa: E402
from fedalign_dist.distributed.collectives import ByteCounter, all_gather_json  # noqa: E402
from fedalign_dist.distributed.env import end_checked_rank, init_distributed  # noqa: E402
from fedalign_dist.distributed.sharded_aggregation import ShardedAggregation  # noqa: E402
from fedalign_dist.models.build import build_model, structure_only  # noqa: E402
from fedalign_dist.run_lifecycle import RunLifecycle  # noqa: E402
from fedalign_dist.train import quiet_libraries  # noqa: E402


def rise_during(fn) -> int:
    """The resident bytes `fn` adds at its peak on this rank."""
    import gc
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_bytes("VmRSS")
    fn()
    dist.barrier()
    return status_bytes("VmHWM") - before


def export_by_part(cfg, trainer, shard, sharded) -> None:
    RunLifecycle(cfg, None, None, None, None)._export_by_part(trainer, shard, sharded)


def export_whole(cfg, trainer, shard, sharded) -> None:
    """The export before it was written by part: the whole state on the run's first rank."""
    from safetensors.torch import save_file
    whole = sharded.whole_on_first(shard) if sharded.group.index == 0 else None
    if dist.get_rank() == 0:
        folder = cfg.run_dir / "final_whole"
        folder.mkdir(parents=True)
        save_file(whole, str(folder / "global.safetensors"))
        trainer.module.save_pretrained(str(folder / "model"), state_dict=whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--groups", default="2,4", help="group sizes to measure (those dividing the world)")
    args = parser.parse_args()
    quiet_libraries()
    env = init_distributed("gloo")
    tok = build_tokenizer("byte")
    print_rows = []
    for group_size in (int(g) for g in args.groups.split(",") if env.world_size % int(g) == 0):
        out = Path(tempfile.mkdtemp(prefix="export_bench_")) if env.rank == 0 else None
        out = Path(all_gather_json(str(out))[0])
        cfg = load_config(None, [f"model.preset={args.preset}", f"model.num_experts={args.experts}",
                                 "data.max_length=64", f"run.output_dir={out}", "run.name=r",
                                 f"fed.ranks_per_client={group_size}", "local.batch_size=4"])
        group = GroupMPU(group_size)
        with structure_only(cfg) if group.group_rank else nullcontext():  # as runs build: one host copy per group
            model = build_model(cfg, tok)[0]
        trainer = LocalTrainer(model, cfg, env.device, group=group)
        sharded = ShardedAggregation(trainer.shapes(), group, env.device, ByteCounter())
        shard = trainer.read_state(sharded.owner)
        shard = {n: t + 0.25 for n, t in shard.items()}  # a global state the module does not hold
        by_part = rise_during(functools.partial(export_by_part, cfg, trainer, shard, sharded))
        whole = rise_during(functools.partial(export_whole, cfg, trainer, shard, sharded))
        rises = all_gather_json([by_part, whole])
        if env.rank == 0:
            from safetensors.torch import load_file
            a, b = (load_file(cfg.run_dir / f / "global.safetensors") for f in ("final", "final_whole"))
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), "the exports differ"
            state_mib = sum(t.numel() * t.element_size() for t in a.values()) / 2**20
            print_rows.append(f"| {group_size} | {state_mib:.0f} MiB | {max(r[0] for r in rises) / 2**20:.0f} MiB | "
                              f"{max(r[1] for r in rises) / 2**20:.0f} MiB | "
                              f"{', '.join(f'{r[0] / 2**20:.0f}' for r in rises)} |")
        del trainer, model
    if env.rank == 0:
        print(f"preset {args.preset} ({args.experts} experts), {env.world_size} ranks, fp32; resident rise during the "
              f"export")
        print("| G | global state | by part, fullest rank | whole on the first rank, fullest rank | by part, each rank "
              "(MiB) |")
        print("|---|---|---|---|---|")
        print("\n".join(print_rows))


if __name__ == "__main__":
    main()
    end_checked_rank()  # not interpreter finalization, which can abort a finished rank
