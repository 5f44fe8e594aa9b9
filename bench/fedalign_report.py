"""FedAlign-MoE benchmark: the numbers issue 3 asks for, measured in one invocation.

    python bench/fedalign_report.py              # a few minutes on 2 CPU cores

The demo config (2 ranks) with fedavg, fedmoe and fedalign at equal rounds: aggregation time
and bytes per rank (fedalign / fedavg ratios), statistics-pass time, accuracies. Bytes per rank
per round for comm=allgather vs comm=reduce against clients per rank are measured by the
systems suite: fedalign-dist bench --systems --out DIR."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out_dir: Path, name: str, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", "configs/demo.yaml",
           f"run.output_dir={out_dir}", f"run.name={name}", *overrides]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def demo_comparison(out_dir: Path, extra: list[str]) -> None:
    print("== demo config, 2 ranks, equal rounds (one seed: a smoke comparison) ==")
    results = {name: run(out_dir, name, [f"strategy.name={name}", *extra]) for name in ("fedavg", "fedmoe", "fedalign")}
    print(f"{'strategy':<10} {'agg s/round':>11} {'stats s/round':>13} {'round s':>8} {'bytes sent/rank/round':>22} "
          f"{'global acc':>10} {'pers acc':>9}")
    for name, records in results.items():
        print(f"{name:<10} {mean(records, 'time_aggregate_s'):>11.4f} {mean(records, 'time_stats_s'):>13.3f} "
              f"{mean(records, 'time_round_s'):>8.2f} {mean(records, 'bytes_sent'):>22,.0f} "
              f"{records[-1]['global_accuracy']:>10.4f} {records[-1]['personalized_accuracy']:>9.4f}")
    base, aligned = results["fedavg"], results["fedalign"]
    print(
        "fedalign / fedavg: aggregation time "
        f"x{mean(aligned, 'time_aggregate_s') / mean(base, 'time_aggregate_s'):.2f}, "
        f"bytes sent per rank x{mean(aligned, 'bytes_sent') / mean(base, 'bytes_sent'):.4f}, "
        f"round time x{mean(aligned, 'time_round_s') / mean(base, 'time_round_s'):.3f}"
    )
    last = aligned[-1]
    print(f"fedalign last round: aligned_fraction {last['aligned_fraction']:.3f}, routing_js_mean "
          f"{last['routing_js_mean']:.4f}, consistency_min {last['consistency_min']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides for the demo comparison")
    args = parser.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="fedalign_bench_"))
    demo_comparison(out_dir, args.overrides)


if __name__ == "__main__":
    main()
