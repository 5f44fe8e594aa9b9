"""Resilience numbers (issue 4), measured in one invocation on 2 ranks.

    python bench/resilience_report.py       # a few minutes on 2 CPU cores

Seconds per round and peak RSS from 16 to 1,000 clients are measured by the systems suite:
fedalign-dist bench --systems --out DIR.
1. Kill-and-resume: a 4-round run, once clean and once with rank 1 SIGKILLed after round 1
   under torchrun --max-restarts=1: wall times and the time lost.
2. The one-node SLURM job (slurm/one_node.sbatch on a real local cluster), when SLURM is
   installed and this runs as root: submit-to-exit wall time.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port, torchrun  # noqa: E402
from tests.faults import run_and_kill  # noqa: E402
from tests.slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402

TINY = ["data.max_examples=400", "data.max_length=64", "data.min_client_examples=5", "local.steps=3",
        "local.batch_size=4", "eval.batch_size=64"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timed(job) -> float:
    t0 = time.perf_counter()
    job()
    return time.perf_counter() - t0


def kill_and_resume(out_dir: Path) -> None:
    print("== kill-and-resume (4 rounds, demo config, tiny settings, 2 ranks) ==")
    args = ["-m", "fedalign_dist", "train", "--config", "configs/demo.yaml", f"run.output_dir={out_dir}", *TINY,
            "fed.rounds=4", "checkpoint.every=1", "run.resume=auto"]
    # An untimed one-round run first: the first start on a machine pays one-off costs (op
    # builds, data caches) that would otherwise land on whichever run is measured first.
    warm = timed(lambda: torchrun(args + ["run.name=warmup", "fed.rounds=1"], nproc=2))
    clean = timed(lambda: torchrun(args + ["run.name=clean"], nproc=2))
    killed = run_and_kill(args + ["run.name=killed"], out_dir / "killed", free_port(), kill_rank=1, after_rounds=2)
    if killed["returncode"] != 0:
        raise SystemExit(killed["output"][-3000:])
    print(f"warm-up {warm:.1f} s (not counted); clean {clean:.1f} s, killed + restarted + resumed "
          f"{killed['wall_s']:.1f} s, time lost {killed['wall_s'] - clean:.1f} s")


def slurm(out_dir: Path) -> None:
    print("== SLURM one-node job ==")
    reason = unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return
    with SlurmCluster(out_dir / "slurm_cluster") as cluster:
        t0 = time.perf_counter()
        out = cluster.sbatch_wait("slurm/one_node.sbatch", ["configs/demo.yaml", f"run.output_dir={out_dir}", *TINY,
                                                            "fed.rounds=2", "run.name=slurm"],
                                  cwd=REPO, output=out_dir / "slurm.out")
        wall = time.perf_counter() - t0
    print(f"sbatch --wait exit {out.returncode}, wall {wall:.1f} s, rounds {len(records(out_dir / 'slurm'))}")


if __name__ == "__main__":
    folder = Path(tempfile.mkdtemp(prefix="fedalign_scale_"))
    kill_and_resume(folder)
    slurm(folder)
