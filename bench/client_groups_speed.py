"""Seconds per round and memory per rank of whole runs with client groups of G = 1, 2, 4 ranks
on 4 ranks (fed.ranks_per_client), the same clients and rounds each time; read from each run's
metrics.

    python bench/client_groups_speed.py [--groups 1,2,4] [key=value ...]   # ~4 min on 2 cores

Defaults: configs/demo.yaml with the small preset, 8 clients (all of them every round), 3 rounds,
evaluation only after the last round, and left out of s/round; round 1 (engine start-up and
first allocations) is left out of the mean."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ["model.preset=small", "fed.num_clients=8", "fed.clients_per_round=8", "fed.rounds=3", "eval.every=100",
            "eval.personalized_every=100", "checkpoint.every=0", "strategy.name=fedavg"]


def run(group_size: int, overrides: list[str], out_dir: Path) -> list[dict]:
    name = f"g{group_size}"
    subprocess.run([sys.executable, "-m", "fedalign_dist", "run", "--nproc", "4", "--config", "configs/demo.yaml",
                    *DEFAULTS, *overrides, f"fed.ranks_per_client={group_size}", f"run.output_dir={out_dir}",
                    f"run.name={name}"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="1,2,4")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="fedalign_groups_"))
    print(f"4 ranks, configs/demo.yaml {' '.join(DEFAULTS + args.overrides)}; mean over rounds 2 onwards")
    print("| G | s/round without evaluation | local s | aggregate s | sync s | peak RSS per rank (max) "
          "| MB sent between groups by the busiest rank per round | MB sent within its group |")
    print("|---|---|---|---|---|---|---|---|")
    for group_size in (int(g) for g in args.groups.split(",")):
        later = run(group_size, args.overrides, out_dir)[1:]
        print(
            f"| {group_size} | {mean(later, 'time_round_s') - mean(later, 'time_eval_s'):.2f} | "
            f"{mean(later, 'time_local_s'):.2f} | "
            f"{mean(later, 'time_aggregate_s'):.2f} | {mean(later, 'time_sync_s'):.2f} | "
            f"{max(max(r['peak_rss_mb_per_rank']) for r in later):.0f} MB | "
            f"{max(max(r['bytes_sent_per_rank']) for r in later) / 1e6:.1f} | "
            f"{max(max(r['bytes_sent_within_group_per_rank']) for r in later) / 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
