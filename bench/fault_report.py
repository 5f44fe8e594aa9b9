"""Safety numbers (issue 11), measured in one invocation: each fault injected into a real job,
what the user sees, how long until every process has exited, and whether anything was lost.

    python bench/fault_report.py        # ~5 minutes on 2 CPU cores; prints a markdown table

Faults come from outside (a user's folder, a corrupt checkpoint, a relative output folder on
two "nodes") or through the test hook FEDALIGN_DIST_FAULT (fedalign_dist/faults.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.faults import TRAIN, fault_time, run_plain_ranks  # noqa: E402
from tests.slurm_cluster import SlurmCluster, unavailable_reason  # noqa: E402

TINY = ["data.max_examples=400", "data.max_length=64", "data.min_client_examples=5", "local.steps=3",
        "local.batch_size=4", "eval.batch_size=64", "fed.rounds=2", "fed.num_clients=4", "fed.clients_per_round=4"]
AMOLE = ["strategy.name=fedamole", "model.family=llama", "strategy.fedamole.num_experts=6",
         "strategy.fedamole.rank=4", "strategy.fedamole.max_experts=4"]
ROWS: list[tuple[str, str, str, str, str]] = []


def user_sees(text: str) -> str:
    """The line a user would read first: the project's own error or warning."""
    for pattern in (r"fedalign-dist: (?:error: )?(.*:\n.*|.*)", r"(WARNING: round \d+: client .*)",
                    r"(resumed from .*)"):
        found = re.search(pattern, text)
        if found:
            line = " ".join(found.group(1).split())  # a message that goes on under its first line
            return line if len(line) <= 150 else line[:147] + "..."
    return "(no message)"


def run(args: list[str], fault: str = "", launcher: str = "torchrun", nproc: int = 2, cwd: Path = REPO):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FEDALIGN_DIST_FAULT=fault)
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}"] + TRAIN[1:] + args
    else:
        cmd = TRAIN + args
    t0 = time.time()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout + out.stderr, t0, time.time()


def row(fault, text, codes, seconds, lost):
    ROWS.append((fault, user_sees(text), codes, f"{seconds:.1f}", lost))
    print(" | ".join(ROWS[-1]), flush=True)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finite_final(run_dir: Path) -> bool:
    import torch
    from safetensors.torch import load_file
    return all(bool(torch.isfinite(t).all()) for t in load_file(run_dir / "final/global.safetensors").values())


def folders(root: Path) -> None:
    out = root / "out"
    (out / "mydata").mkdir(parents=True)
    (out / "mydata/thesis.tex").write_text("years of work")
    (root / "sibling").mkdir()
    (root / "sibling/notes.txt").write_text("mine")
    base = [f"run.output_dir={out}", *TINY]
    code, text, t0, t1 = run(base + ["run.name=mydata", "run.resume=auto"], launcher="plain")
    intact = (out / "mydata/thesis.tex").read_text() == "years of work"
    row("user folder as run.name, run.resume=auto", text, str(code), t1 - t0, "none" if intact else "LOST")
    code, text, t0, t1 = run(base + ["run.name=..", "run.overwrite=true"], launcher="plain")
    intact = (root / "sibling/notes.txt").exists() and (out / "mydata/thesis.tex").exists()
    row("run.name=.. run.overwrite=true", text, str(code), t1 - t0, "none" if intact else "LOST")
    run(base + ["run.name=r", "checkpoint.every=1"], nproc=1)
    for path in (out / "r/checkpoints").glob("*/global.safetensors"):
        path.write_bytes(path.read_bytes()[:-1] + b"\0")
    code, text, t0, t1 = run(base + ["run.name=r", "run.resume=auto"], launcher="plain")
    intact = len(records(out / "r")) == 2 and (out / "r/final").exists()
    row("every checkpoint corrupt, run.resume=auto", text, str(code), t1 - t0, "none" if intact else "LOST")


def divergence(root: Path) -> None:
    base = [f"run.output_dir={root}", *TINY, "strategy.name=fedalign"]
    code, text, t0, t1 = run(base + ["run.name=diverged"], fault="diverge_client=2")
    recs = records(root / "diverged")
    ok = finite_final(root / "diverged") and all(r["rejected_clients"] == [2] for r in recs)
    row("client 2 diverges (lr 1e20), fedalign, 2 ranks", text, str(code), t1 - t0,
        "none (final model finite, client 2 rejected each round)" if ok else "POISONED")
    code, text, t0, t1 = run(base + ["run.name=overflow", "strategy.name=fedavg"], fault="huge_delta_client=2")
    clean = not (root / "overflow/final").exists() and not (root / "overflow/summary.json").exists()
    row("finite update of 1e38 overflows the global sum", text, str(code), t1 - t0,
        "none (no final model, no summary)" if clean else "NaN PUBLISHED")


def exceptions(root: Path) -> None:
    cases = [("rsea_solve", 0, AMOLE), ("checkpoint_commit", 0, ["checkpoint.every=1"]),
             ("local_training", 1, ["strategy.name=fedalign"])]
    for point, rank, extra in cases:
        logs = root / f"plain_{point}"
        logs.mkdir()
        ranks = run_plain_ranks([f"run.output_dir={root}", *TINY, f"run.name=plain_{point}_run", *extra],
                                f"{point}@{rank}", logs)
        t_fault = fault_time(ranks[rank]["output"])
        row(f"exception on rank {rank} in {point}, plain processes (srun mode)", ranks[1 - rank]["output"],
            ", ".join(str(r["code"]) for r in ranks), max(r["end"] for r in ranks) - t_fault, "none")
    code, text, _, t1 = run([f"run.output_dir={root}", *TINY, "run.name=tr", "checkpoint.every=1"],
                            fault="checkpoint_commit@0")
    row("exception on rank 0 in checkpoint_commit, torchrun", text, str(code), t1 - fault_time(text),
        "none (round 0's metrics line kept)" if len(records(root / "tr")) == 1 else "LOST")


def resume(root: Path) -> None:
    base = [f"run.output_dir={root}", *TINY, "run.name=res", "fed.rounds=4", "checkpoint.every=1"]
    run(base + ["fed.rounds=2"], nproc=1)
    code, text, _, _ = run(base + ["run.resume=true"], fault="checkpoint_commit@0", nproc=1)
    t0 = time.time()
    code, text, _, t1 = run(base + ["run.resume=auto"], nproc=1)
    rounds = [r["round"] for r in records(root / "res")]
    row("crash between round 2's metrics and its checkpoint, then resume", text, str(code), t1 - t0,
        f"none (metrics rounds {rounds})")


def two_nodes(root: Path) -> None:
    port, procs = free_port(), []
    t0 = time.time()
    for node in (0, 1):
        cwd = root / f"node{node}"
        cwd.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two",
               "-m", "fedalign_dist", "train", "--config", str(REPO / "configs/demo.yaml"), *TINY,
               "run.output_dir=runs", "run.name=r"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    row("run folder not shared (relative output_dir on 2 nodes)", outs[0][1], ", ".join(str(c) for c, _ in outs),
        time.time() - t0, "none (refused at start)")


def slurm(root: Path) -> None:
    reason = unavailable_reason()
    if reason:
        print(f"SLURM row skipped: {reason}")
        return
    with SlurmCluster(root / "cluster") as cluster:
        cluster.env["FEDALIGN_DIST_FAULT"] = "checkpoint_commit@0"
        t0 = time.time()
        out = cluster.sbatch_wait("slurm/srun_tasks.sbatch", ["configs/demo.yaml", f"run.output_dir={root}", *TINY,
                                                              "run.name=slurm", "checkpoint.every=1"],
                                  cwd=REPO, output=root / "slurm.out")
        t1 = time.time()
    text = (root / "slurm.out").read_text() if (root / "slurm.out").exists() else out.stderr
    row("exception on rank 0 in checkpoint_commit, sbatch srun_tasks.sbatch", text, str(out.returncode),
        t1 - t0, "none")


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp(prefix="fedalign_faults_"))
    print("fault | what the user sees | exit code(s) | seconds to exit | data lost")
    for part in (folders, divergence, exceptions, resume, two_nodes, slurm):
        (root / part.__name__).mkdir()
        part(root / part.__name__)
    print("\n| fault injected | what the user sees | exit code(s) | s to exit | data lost |\n|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    print("\n(seconds: from the injected fault to the last process's exit where the fault prints its time; "
          "otherwise the command's wall time, start-up included; SLURM: submit to job end)")
