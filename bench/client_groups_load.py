"""Host memory of starting a client group (fed.ranks_per_client=G) from a checkpoint
(model.path): each rank's peak rise in private (anonymous) memory while the model is built
and cut into ZeRO-3 slices over its group, with the group's first rank reading the checkpoint
into the slices (runs do this since 2026-12-07) against building the whole model from it
first (before), on the same checkpoint. One launch of 4 ranks per (G, way), so that neither
way inherits the other's freed memory:

    python bench/client_groups_load.py [--preset medium] [--groups 2,4] [--dtype bfloat16]
    # ~2 min on 2 cores

The checkpoint is the preset saved by transformers (per-expert tensors on disk, files of at
most 100 MB, in --dtype as released checkpoints are). Private memory is sampled from
/proc/self/status (RssAnon) every 2 ms: pages of the memory-mapped checkpoint that a rank has
read belong to the file (the kernel may drop them), so they are left out; the peak resident
rise (VmHWM, which counts them) is shown beside it. The sum of every rank's slices is printed
for both ways: they hold the same values.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.client_groups_memory import status_bytes  # noqa: E402


def peak_rise(fn) -> tuple[int, int]:
    """(peak RssAnon rise, peak VmHWM rise) in bytes while `fn` runs."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before_anon, before_rss = status_bytes("RssAnon"), status_bytes("VmRSS")
    peak, done = [before_anon], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], status_bytes("RssAnon"))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], status_bytes("RssAnon")) - before_anon, status_bytes("VmHWM") - before_rss


def one_rank(args) -> None:
    """Under torchrun: build and slice the model one way, write this launch's numbers."""
    import torch.distributed as dist

    from fedalign_dist.clients.group_mpu import GroupMPU
    from fedalign_dist.clients.trainer import StepPath, deepspeed_config, partition_over_group
    from fedalign_dist.config import load_config
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.distributed.collectives import all_gather_json
    from fedalign_dist.distributed.env import end_checked_rank, init_distributed
    from fedalign_dist.models.build import build_model, structure_only
    from fedalign_dist.models.checkpoint_by_part import loads_by_part
    from fedalign_dist.train import quiet_libraries
    quiet_libraries()
    env = init_distributed("gloo")
    cfg = load_config(None, [f"model.path={args.checkpoint}", f"model.num_experts={args.experts}",
                             "data.max_length=64", "local.batch_size=4", f"fed.ranks_per_client={args.group}"])
    assert loads_by_part(cfg), "the bench's checkpoint would not be read by part"
    by_part = args.way == "by_part"
    group = GroupMPU(args.group)
    holder = {}

    def build():
        with structure_only(cfg) if group.group_rank or by_part else nullcontext():
            model = build_model(cfg, build_tokenizer("byte"))[0]
        config = deepspeed_config(cfg, model.config.hidden_size, StepPath.full(), group.size)
        partition_over_group(model, group, config, env.device, cfg.model.path if by_part else None)
        holder["model"] = model
        dist.barrier()
    rise = peak_rise(build)
    total = sum(float(p.ds_tensor.double().sum()) for p in holder["model"].parameters())
    rows = all_gather_json([*rise, total])
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    end_checked_rank()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--groups", default="2,4", help="group sizes to measure on 4 ranks")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the checkpoint's")
    parser.add_argument("--rank-of", nargs=4, metavar=("CHECKPOINT", "GROUP", "WAY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of:
        checkpoint, group, way, out = args.rank_of
        one_rank(argparse.Namespace(checkpoint=checkpoint, group=int(group), way=way, out=out,
                                    experts=args.experts))
        return
    from fedalign_dist.config import load_config
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.models.build import build_model
    from fedalign_dist.train import quiet_libraries
    quiet_libraries()
    folder = Path(tempfile.mkdtemp(prefix="load_bench_"))
    saved = build_model(load_config(None, [f"model.preset={args.preset}", f"model.num_experts={args.experts}",
                                           "data.max_length=64"]), build_tokenizer("byte"))[0]
    params_mib = sum(p.numel() * 4 for p in saved.parameters()) / 2**20
    saved.to(getattr(torch, args.dtype)).save_pretrained(str(folder / "checkpoint"), max_shard_size="100MB")
    files = sorted((folder / "checkpoint").glob("*.safetensors"))
    del saved
    print(f"preset {args.preset} ({args.experts} experts, fp32 parameters {params_mib:.0f} MiB), checkpoint "
          f"{args.dtype} {sum(f.stat().st_size for f in files) / 2**20:.0f} MiB in {len(files)} files, 4 ranks; "
          f"peak rise while the model is built and sliced, MiB")
    print("| G | way | private, fullest rank | private, each rank | resident, fullest rank | sum of the slices |")
    print("|---|---|---|---|---|---|")
    for group in args.groups.split(","):
        for way in ("whole_first", "by_part"):
            out = folder / f"{group}_{way}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                            __file__, "--experts", str(args.experts), "--rank-of", str(folder / "checkpoint"),
                            group, way, str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = json.loads(out.read_text())
            mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
            print(f"| {group} | {way.replace('_', ' ')} | {mib(max(r[0] for r in rows))} | "
                  f"{', '.join(mib(r[0]) for r in rows)} | {mib(max(r[1] for r in rows))} | "
                  f"{sum(r[2] for r in rows):.6g} |", flush=True)


if __name__ == "__main__":
    main()
