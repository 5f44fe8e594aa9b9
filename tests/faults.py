"""Faults from outside a real job: kill a worker of a running torchrun job (no hooks in the
code under test), or start one plain process per rank (as `srun` does) with a fault injected
through FEDALIGN_DIST_FAULT (fedalign_dist/faults.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def rounds_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def run_and_kill(args: list[str], run_dir: Path, port: int, kill_rank: int, after_rounds: int,
                 nproc: int = 2, timeout: float = 600) -> dict:
    """Start `torchrun --max-restarts=1 ARGS`; once `after_rounds` rounds are logged, SIGKILL
    the worker with RANK=kill_rank. Returns the exit code, wall time and the killed pid."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"] + args
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        while killed is None and proc.poll() is None and time.perf_counter() - t0 < timeout:
            if rounds_logged(run_dir) >= after_rounds:
                for child in _children(proc.pid):
                    if _rank_of(child) == kill_rank:
                        os.kill(child, signal.SIGKILL)
                        killed = child
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=max(timeout - (time.perf_counter() - t0), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0, "killed_pid": killed,
            "output": output}


def final_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TRAIN = [sys.executable, "-m", "fedalign_dist", "train", "--config", "configs/demo.yaml"]


def run_plain_ranks(args: list[str], fault: str, logs: Path, nproc: int = 2, timeout: float = 300,
                    cwd: Path = REPO) -> list[dict]:
    """Start `fedalign_dist train ARGS` once per rank with RANK/WORLD_SIZE/MASTER_* set as srun
    mode sets them, and no agent to stop the others when one fails; returns each rank's exit
    code, exit time (time.time()) and output."""
    from tests.conftest import free_port
    port, procs = free_port(), []
    for rank in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FEDALIGN_DIST_FAULT=fault)
        log = open(logs / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(TRAIN + args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    ends, t0 = [None] * nproc, time.time()
    while None in ends and time.time() - t0 < timeout:
        for i, (proc, _) in enumerate(procs):
            if ends[i] is None and proc.poll() is not None:
                ends[i] = time.time()
        time.sleep(0.1)
    out = []
    for i, (proc, log) in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
        out.append({"code": proc.returncode, "end": ends[i], "output": (logs / f"rank{i}.log").read_text()})
    return out


def fault_time(text: str) -> float:
    """When the injected fault fired (time.time(), as fedalign_dist/faults.py prints it)."""
    return float(re.search(r"injected fault at \w+ on rank \d+ \(t=([0-9.]+)\)", text).group(1))
