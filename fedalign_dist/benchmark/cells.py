"""One benchmark cell = one `fedalign-dist run` in its own folder. A finished cell (it has
summary.json) is never run again, so a half-finished benchmark resumes where it stopped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


class BenchmarkFailed(RuntimeError):
    """One or more cells failed; finished cells are kept, rerunning resumes."""


def launch_cell(config: str, nproc: int, run_dir: Path, overrides: list[str], log=print) -> None:
    if finished(run_dir):
        return  # finished before: resume the benchmark, not the run
    if run_dir.is_dir() and any(run_dir.iterdir()):
        from fedalign_dist.run_folder import clear_run_folder
        clear_run_folder(run_dir)  # a half-written cell starts again (refused for a folder that is not a run)
    cmd = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", str(nproc), "--config", config,
           f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    warning = cell_outcome(run_dir, done.returncode, done.stdout)
    if warning:
        log(warning)


def launch_floor(config: str, nproc: int, out_json: Path, overrides: list[str]) -> None:
    """The plain-torch floor of the same workload (benchmark/floor.py) on `nproc` ranks."""
    if out_json.is_file():
        return
    out_json.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fedalign_dist.benchmark.floor", "--config", config, "--out", str(out_json), *overrides]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise BenchmarkFailed(f"the floor run {out_json} failed ({done.returncode}):\n{done.stdout[-4000:]}")


def finished(run_dir: Path) -> bool:
    """summary.json is the run's last output, written after the final model and metrics."""
    return (run_dir / "summary.json").is_file()


def cell_outcome(run_dir: Path, returncode: int, output: str) -> str | None:
    """None for a clean cell; a warning for a cell that crashed in process teardown after
    writing every output (kept: its results are complete, and a rerun would skip it anyway);
    BenchmarkFailed for a cell that did not finish."""
    if returncode == 0:
        return None
    if not finished(run_dir):
        raise BenchmarkFailed(f"benchmark cell {run_dir} failed ({returncode}):\n{output[-4000:]}")
    return (f"warning: benchmark cell {run_dir} finished, then a rank exited with an error ({returncode}) "
            f"while shutting down; its results are complete and kept. Last output:\n{output[-1500:]}")


def read_records(run_dir: Path) -> list[dict]:
    """The per-round records of a finished cell (metrics.jsonl)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
