"""Which client-group size lets a preset train within a per-rank memory budget: one launch of
bench/client_groups_memory.py per G on 4 ranks, each rank's heap limited to what it holds before
the model is built plus the budget (RLIMIT_DATA, standing in for a device's memory).

    python bench/client_groups_budget.py [--preset medium] [--experts 8] [--budget-mib 2048]
        [--groups 1,2,4] [--nproc 4]            # ~5 min on 2 cores for the medium preset
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

MEMORY_BENCH = Path(__file__).resolve().parent / "client_groups_memory.py"
PARTS = ["parameters", "fp32 masters", "gradients", "AdamW moments"]


def launch(args, group_size: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", str(MEMORY_BENCH),
               "--preset", args.preset, "--experts", str(args.experts), "--steps", "1", "--groups", str(group_size),
               "--budget-mib", str(args.budget_mib)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"fits": 0, "error": f"no result in {args.timeout_s} s", "launch s": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    out_of_budget = [line for line in done.stdout.splitlines() if line.startswith("OUT OF BUDGET")]
    if out_of_budget:
        asked = re.search(r"(rank \d+):.*allocate (\d+) bytes", out_of_budget[0])
        why = f"{asked[1]} could not allocate {int(asked[2]) / 2**20:.0f} MiB more" if asked else out_of_budget[0]
        return {"fits": 0, "error": why, "launch s": seconds}
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"G={group_size}: exit {done.returncode}: {tail}")
    return {"fits": 1, **json.loads(lines[-1])[str(group_size)], "launch s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--budget-mib", type=int, default=2048)
    parser.add_argument("--groups", default="1,2,4")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--timeout-s", type=int, default=300)
    args = parser.parse_args()
    print(f"preset {args.preset}, {args.experts} experts, {args.nproc} ranks, fp32; each rank's heap budget "
          f"{args.budget_mib} MiB beyond its holdings before the model")
    print("| G | trains within the budget | state held on the fullest rank | peak resident | s/step | launch s |")
    print("|---|---|---|---|---|---|")
    for group_size in (int(g) for g in args.groups.split(",")):
        row = launch(args, group_size)
        if row["fits"]:
            held = sum(row[k] for k in PARTS) / 2**20
            print(f"| {group_size} | yes | {held:.0f} MiB | {row['peak resident'] / 2**20:.0f} MiB | "
                  f"{row['s/step']:.2f} | {row['launch s']:.0f} |")
        else:
            print(f"| {group_size} | no: {row['error']} | - | - | - | {row['launch s']:.0f} |")


if __name__ == "__main__":
    main()
