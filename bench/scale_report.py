"""Scale and resilience numbers (issue 4), measured in one invocation on 2 ranks.

    python bench/scale_report.py            # about 8 minutes on 2 CPU cores

1. configs/scale.yaml with 1,000 clients vs 16 clients, the same 16 clients per round and
   the same examples per client (the 16-client run keeps 16/1000 of the tweets): seconds
   per round (rounds without global evaluation) and peak RSS per rank.
2. Kill-and-resume: a 4-round run, once clean and once with rank 1 SIGKILLed after round 1
   under torchrun --max-restarts=1: wall times and the time lost.
3. The one-node SLURM job (slurm/one_node.sbatch on a real local cluster), when SLURM is
   installed and this runs as root: submit-to-exit wall time.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.faults import run_and_kill  # noqa: E402
from tests.slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402

TINY = ["data.max_examples=400", "data.max_length=64", "data.min_client_examples=5", "local.steps=3",
        "local.batch_size=4", "eval.batch_size=64"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(out_dir: Path, name: str, config: str, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", config,
           f"run.output_dir={out_dir}", f"run.name={name}", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def scale(out_dir: Path) -> None:
    print("== 16 vs 1,000 clients (configs/scale.yaml, 16 per round, 4 rounds, 2 ranks) ==")
    common = ["fed.clients_per_round=16", "fed.rounds=4", "eval.every=1000"]
    runs = {16: common + ["fed.num_clients=16", "data.max_examples=1013"], 1000: common + ["fed.num_clients=1000"]}
    for clients, overrides in runs.items():
        launch(out_dir, f"scale_{clients}", "configs/scale.yaml", overrides)
        recs = records(out_dir / f"scale_{clients}")
        plain = [r["time_round_s"] for r in recs[:-1]]  # the last round also evaluates the global model
        on_disk = sum(1 for _ in (out_dir / f"scale_{clients}" / "clients").rglob("*.safetensors"))
        print(f"{clients:>5} clients: {sum(plain) / len(plain):6.2f} s/round (rounds 0-{len(plain) - 1}), "
              f"peak RSS per rank {[round(x) for x in recs[-1]['peak_rss_mb_per_rank']]} MB, "
              f"client state files on disk {on_disk}")


def kill_and_resume(out_dir: Path) -> None:
    print("== kill-and-resume (4 rounds, demo config, tiny settings, 2 ranks) ==")
    args = ["-m", "fedalign_dist", "train", "--config", "configs/demo.yaml", f"run.output_dir={out_dir}", *TINY,
            "fed.rounds=4", "checkpoint.every=1", "run.resume=auto"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{free_port()}", *args, "run.name=clean"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clean = time.perf_counter() - t0
    killed = run_and_kill(args + ["run.name=killed"], out_dir / "killed", free_port(), kill_rank=1, after_rounds=2)
    if killed["returncode"] != 0:
        raise SystemExit(killed["output"][-3000:])
    print(f"clean {clean:.1f} s, killed + restarted + resumed {killed['wall_s']:.1f} s, "
          f"time lost {killed['wall_s'] - clean:.1f} s")


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
    scale(folder)
    kill_and_resume(folder)
    slurm(folder)
