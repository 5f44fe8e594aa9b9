"""A failure on one rank ends every rank of the job promptly, non-zero, with the failing
rank's traceback shown once: started as plain processes (one per rank, as `srun` starts them,
with no agent to kill the others) and under torchrun."""
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port
from tests.faults import TRAIN, fault_time, run_plain_ranks

SCENARIOS = {  # fault: (overrides, failing rank, what the others are told, a frame of the traceback)
    "rsea_solve": (["strategy.name=fedamole", "model.family=llama", "strategy.fedamole.num_experts=6",
                    "strategy.fedamole.rank=4", "strategy.fedamole.max_experts=4"], 0,
                   "the reverse-selection (RSEA) solve", "in reverse_selection"),
    "checkpoint_commit": (["strategy.name=fedavg", "checkpoint.every=1"], 0, "committing the checkpoint",
                          "in commit_checkpoint"),
    "local_training": (["strategy.name=fedalign"], 1, "local training", "in maybe_raise"),
}


@pytest.mark.parametrize("point", sorted(SCENARIOS))
def test_one_rank_failing_ends_plain_rank_processes_within_60s(tmp_path, tiny_overrides, point):
    extra, failing, during, frame = SCENARIOS[point]
    ranks = run_plain_ranks(tiny_overrides + extra + ["run.name=r", "fed.num_clients=4", "fed.clients_per_round=4",
                                                      "dist.timeout_s=600"], f"{point}@{failing}", tmp_path)
    bad, other = ranks[failing], ranks[1 - failing]
    assert bad["code"] != 0 and other["code"] != 0, [r["output"][-2000:] for r in ranks]
    t_fault = fault_time(bad["output"])
    assert max(r["end"] for r in ranks) - t_fault < 60, [r["end"] - t_fault for r in ranks]
    assert bad["output"].count(frame) == 1 and f"RuntimeError: injected fault: {point}" in bad["output"]
    assert f"rank {failing} failed during {during}; rank {1 - failing} stops too" in other["output"]
    assert "Traceback" not in other["output"], other["output"][-2000:]


def test_rank0_failure_under_torchrun_shows_its_traceback_once(tmp_path, tiny_overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FEDALIGN_DIST_FAULT="checkpoint_commit@0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}"] + TRAIN[1:] + tiny_overrides + [
        "run.name=r", "strategy.name=fedavg", "checkpoint.every=1"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert time.time() - fault_time(text) < 60
    assert text.count("in commit_checkpoint") == 1, text[-4000:]  # in torchrun's root-cause summary
    assert "rank 0 failed during committing the checkpoint" in text
    # nothing lost: the round's metrics were written before the checkpoint that failed
    assert (tmp_path / "r/metrics.jsonl").read_text().count('"round": 0') == 1
