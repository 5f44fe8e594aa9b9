"""What client-level DP adds to a round: the default demo (2 ranks, tiny Mixtral, BBC) with and
without `privacy.enabled`, FedAvg and FedAlign-MoE, runs alternated in pairs on one machine.

    python bench/privacy_overhead_report.py [--pairs 2] [--rounds 4] [--out DIR]

Per run: the median over rounds after the first of seconds per round and of the aggregation
phase (where the noise and the accountant run), and the statistics phase (where FedAlign-MoE's
statistics are bounded and noised happens on the client, in `time_local_s`). Evaluation is off,
so the round is training, statistics and aggregation. Prints a table; --out also writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["fed.num_clients=8", "fed.clients_per_round=4", "local.steps=10", "eval.every=1000",
          "eval.personalized_every=1000", "checkpoint.every=0", "run.overwrite=true"]
DP = ["privacy.enabled=true", "privacy.noise_seed=0", "privacy.delta=1e-3"]


def one_run(folder: Path, strategy: str, private: bool, rounds: int) -> dict:
    name = f"{strategy}_{'dp' if private else 'plain'}"
    cmd = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", "configs/demo.yaml",
           f"run.output_dir={folder}", f"run.name={name}", f"strategy.name={strategy}", f"fed.rounds={rounds}",
           *COMMON, *(DP if private else [])]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()][1:]
    return {key: statistics.median(r[key] for r in records)
            for key in ("time_round_s", "time_aggregate_s", "time_local_s", "time_stats_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.pairs):
            for strategy in ("fedavg", "fedalign"):
                for private in (False, True):
                    key = f"{strategy} {'DP' if private else 'plain'}"
                    results.setdefault(key, []).append(one_run(Path(tmp), strategy, private, args.rounds))
    print("| run | s/round | aggregate s | local s | stats s | s/round vs plain |")
    print("|---|---|---|---|---|---|")
    for key, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        plain = statistics.median(r["time_round_s"] for r in results[key.replace("DP", "plain")])
        print(f"| {key} | {med['time_round_s']:.3f} | {med['time_aggregate_s']:.3f} | {med['time_local_s']:.3f} | "
              f"{med['time_stats_s']:.3f} | {med['time_round_s'] / plain:.3f}x |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "privacy_overhead.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
