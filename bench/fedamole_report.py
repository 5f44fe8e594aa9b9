"""FedAMoLE numbers (issue 5), measured in one invocation.

    python bench/fedamole_report.py          # about 5 minutes on 2 CPU cores

1. RSEA solve time (E = 30 experts) at 10, 100 and 1,000 clients (beta chosen feasible).
2. configs/fedamole.yaml (tiny dense Llama, AMoLE on q/v, 8 experts, rank 8) against FedAvg
   with one LoRA of the same rank on q/v of the same base, 2 ranks, equal rounds: upload and
   download bytes per client per round, and the final accuracies (one seed: a smoke test)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedalign_dist.aggregation.rsea import solve_assignment  # noqa: E402


def rsea_times() -> None:
    print("== RSEA solve time, E = 30, M = 8 (scipy milp / HiGHS) ==")
    for clients, beta in ((10, 2), (100, 8), (1000, 100)):
        scores = np.random.default_rng(0).random((30, clients))
        t0 = time.perf_counter()
        solve_assignment(scores, beta, 8)
        print(f"{clients:>5} clients (beta {beta:>3}): {time.perf_counter() - t0:.3f} s per layer")


def run(out_dir: Path, name: str, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", "configs/fedamole.yaml",
           f"run.output_dir={out_dir}", f"run.name={name}", *overrides]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]


def comparison(out_dir: Path, extra: list[str]) -> None:
    print("== configs/fedamole.yaml vs FedAvg + one LoRA (rank 8, q/v), 2 ranks, equal rounds ==")
    amole = run(out_dir, "fedamole", extra)
    lora = run(out_dir, "fedavg_lora", ["strategy.name=fedavg", "model.finetune=lora", "model.lora.rank=8",
                                        "model.lora.alpha=16", *extra])
    down = sum(r["download_bytes_per_client"] for r in amole) / len(amole)
    up = sum(r["upload_bytes_per_client"] for r in amole) / len(amole)
    lora_bytes = lora[0]["trainable_bytes"]
    print(f"bytes per client per round: FedAMoLE download {down:,.0f}, upload {up:,.0f}; "
          f"FedAvg+LoRA {lora_bytes:,} each way (x{down / lora_bytes:.2f} download, x{up / lora_bytes:.2f} upload)")
    print(f"FedAMoLE held experts per layer (mean): {amole[-1]['held_experts_mean']:.2f}; "
          f"RSEA time per round {sum(r['rsea_time_s'] for r in amole) / len(amole):.3f} s")
    for name, recs in (("fedamole", amole), ("fedavg+lora", lora)):
        print(
            f"{name:<12} final global acc {recs[-1]['global_accuracy']:.4f}, personalized "
            f"{recs[-1]['personalized_accuracy']:.4f}, s/round {sum(r['time_round_s'] for r in recs) / len(recs):.2f}"
        )


if __name__ == "__main__":
    rsea_times()
    comparison(Path(tempfile.mkdtemp(prefix="fedamole_bench_")), sys.argv[1:])
