"""Launchers: accelerate launch and a real one-node SLURM cluster start the same entry point."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port
from tests.slurm_cluster import SlurmCluster, unavailable_reason


@pytest.mark.slow  # accelerate's launcher around torchrun's
def test_accelerate_launch_two_processes(tmp_path, tiny_overrides):
    """The accelerate config in launch/ starts the same entry point on 2 ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/one_node.yaml",
           "--main_process_port", str(free_port()), "-m", "fedalign_dist", "train", "--config", "configs/demo.yaml",
           *tiny_overrides, "run.name=acc", "fed.rounds=1"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    records = [json.loads(line) for line in (tmp_path / "acc/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and len(records[0]["bytes_sent_per_rank"]) == 2
    assert json.loads((tmp_path / "acc/summary.json").read_text())["world_size"] == 2


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.mark.slow  # a live slurmctld and slurmd per module, two sbatch jobs (make test-slow)
@pytest.mark.parametrize("script", ["slurm/one_node.sbatch", "slurm/srun_tasks.sbatch"])
def test_sbatch_script_runs_on_a_real_slurm_cluster(slurm, script, tmp_path, tiny_overrides):
    """The project's own sbatch scripts, submitted with `sbatch --wait` to a live slurmctld."""
    log = tmp_path / "job.out"
    out = slurm.sbatch_wait(script, ["configs/demo.yaml", *tiny_overrides, "run.name=slurm"], cwd=REPO, output=log)
    assert out.returncode == 0, out.stderr + (log.read_text()[-5000:] if log.exists() else "") + slurm.logs()
    records = _records(tmp_path / "slurm")
    assert [r["round"] for r in records] == [0, 1]
    assert all(len(r["bytes_sent_per_rank"]) == 2 for r in records)
    assert json.loads((tmp_path / "slurm/summary.json").read_text())["world_size"] == 2
