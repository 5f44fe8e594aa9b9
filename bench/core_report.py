"""Core-machinery benchmark: runs the demo config (2 ranks) and prints the numbers the core
issue asks for, read from the run folder.

    python bench/core_report.py                 # demo config, 2 ranks
    python bench/core_report.py fed.rounds=3    # any overrides

Prints: engine initialisations per rank, aggregation time / round time, bytes per rank per
round against the trainable-parameter bytes, wall time, final accuracies."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(overrides: list[str]) -> None:
    out_dir = Path(tempfile.mkdtemp(prefix="fedalign_bench_"))
    cmd = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", "configs/demo.yaml",
           f"run.output_dir={out_dir}", "run.name=bench", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    run = out_dir / "bench"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    agg = sum(r["time_aggregate_s"] for r in records)
    rnd = sum(r["time_round_s"] for r in records)
    sent = sum(r["bytes_sent"] for r in records) / len(records)
    received = sum(r["bytes_received"] for r in records) / len(records)
    print(f"command: {' '.join(cmd[1:])}")
    print(f"engine initialisations per rank: {summary['engine_inits_per_rank']}")
    print(f"aggregation time / round time:   {agg / rnd:.4f} ({agg:.2f} s of {rnd:.2f} s over {len(records)} rounds)")
    for key in ("time_local_s", "time_sync_s", "time_aggregate_s", "time_eval_s"):
        print(f"  mean {key:<17} {sum(r[key] for r in records) / len(records):.3f}")
    print(f"bytes per rank per round:         sent {sent:,.0f}, received {received:,.0f}")
    print(f"trainable-parameter bytes:        {summary['trainable_bytes']:,} "
          f"(sent/trainable = {sent / summary['trainable_bytes']:.3f})")
    print(f"wall time (launch to exit):       {wall:.1f} s; round loop {summary['wall_s']:.1f} s")
    print(f"final global accuracy:            {summary['final_global_accuracy']:.4f}")
    print(f"final personalized accuracy:      {summary['final_personalized_accuracy']:.4f}")
    print(f"peak RSS per rank (MB):           {records[-1]['peak_rss_mb_per_rank']}")


if __name__ == "__main__":
    main(sys.argv[1:])
