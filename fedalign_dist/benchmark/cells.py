"""One benchmark cell = one `fedalign-dist run` in its own folder. A finished cell (it has
summary.json) is never run again, so a half-finished benchmark resumes where it stopped."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


class BenchmarkFailed(RuntimeError):
    """One or more cells failed; finished cells are kept, rerunning resumes."""


def launch_cell(config: str, nproc: int, run_dir: Path, overrides: list[str]) -> None:
    if (run_dir / "summary.json").is_file():
        return  # finished before: resume the benchmark, not the run
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-written cell starts again
    cmd = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", str(nproc), "--config", config,
           f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise BenchmarkFailed(f"benchmark cell {run_dir} failed ({done.returncode}):\n{done.stdout[-4000:]}")


def read_records(run_dir: Path) -> list[dict]:
    """The per-round records of a finished cell (metrics.jsonl)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
