"""FedAlign-MoE benchmark: the numbers issue 3 asks for, measured in one invocation.

    python bench/fedalign_report.py              # everything (about 10 minutes on 2 CPU cores)
    python bench/fedalign_report.py --skip-demo  # only the communication sweep

1. The demo config (2 ranks) with fedavg, fedmoe and fedalign at equal rounds: aggregation
   time and bytes per rank (fedalign / fedavg ratios), statistics-pass time, accuracies.
2. Bytes per rank per round for comm=allgather vs comm=reduce at 2, 8 and 32 clients per
   rank (2 ranks, IID split, one round, embeddings and LM head frozen so that 64 gathered
   deltas fit in memory; the ratio is what matters)."""
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
    print(f"fedalign / fedavg: aggregation time x{mean(aligned, 'time_aggregate_s') / mean(base, 'time_aggregate_s'):.2f}, "
          f"bytes sent per rank x{mean(aligned, 'bytes_sent') / mean(base, 'bytes_sent'):.4f}, "
          f"round time x{mean(aligned, 'time_round_s') / mean(base, 'time_round_s'):.3f}")
    last = aligned[-1]
    print(f"fedalign last round: aligned_fraction {last['aligned_fraction']:.3f}, routing_js_mean "
          f"{last['routing_js_mean']:.4f}, consistency_min {last['consistency_min']:.3f}")


def comm_sweep(out_dir: Path) -> None:
    print("== bytes per rank per round: allgather vs reduce (2 ranks, one round) ==")
    print(f"{'clients/rank':>12} {'reduce sent':>14} {'allgather sent':>15} {'ratio':>7}")
    for per_rank in (2, 8, 32):
        total = 2 * per_rank
        common = ["strategy.name=fedalign", "data.partition=iid", f"fed.num_clients={total}",
                  f"fed.clients_per_round={total}", "fed.rounds=1", "local.steps=1", "eval.every=1000",
                  "model.freeze=[embed_tokens,lm_head]", "data.min_client_examples=4"]
        sent = {}
        for path in ("reduce", "allgather"):
            records = run(out_dir, f"comm_{path}_{per_rank}", common + [f"strategy.fedalign.comm={path}"])
            sent[path] = max(records[0]["bytes_sent_per_rank"])
        print(f"{per_rank:>12} {sent['reduce']:>14,} {sent['allgather']:>15,} {sent['allgather'] / sent['reduce']:>7.2f}")
    print(f"(trainable bytes with embeddings and LM head frozen: {records[0]['trainable_bytes']:,})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-demo", action="store_true", help="only the allgather/reduce byte sweep")
    parser.add_argument("--skip-comm", action="store_true", help="only the demo comparison")
    parser.add_argument("overrides", nargs="*", help="config overrides for the demo comparison")
    args = parser.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="fedalign_bench_"))
    if not args.skip_demo:
        demo_comparison(out_dir, args.overrides)
    if not args.skip_comm:
        comm_sweep(out_dir)


if __name__ == "__main__":
    main()
