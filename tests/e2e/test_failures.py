"""A failure on one rank ends every rank of the job promptly, non-zero, with the failing
rank's traceback shown once: started as plain processes (one per rank, as `srun` starts them,
with no agent to kill the others) and under torchrun."""
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port

TRAIN = [sys.executable, "-m", "fedalign_dist", "train", "--config", "configs/demo.yaml"]
SCENARIOS = {
    "rsea_solve": (["strategy.name=fedamole", "model.family=llama", "strategy.fedamole.num_experts=6",
                    "strategy.fedamole.rank=4", "strategy.fedamole.max_experts=4"],
                   "the reverse-selection (RSEA) solve", "in reverse_selection"),
    "checkpoint_commit": (["strategy.name=fedavg", "checkpoint.every=1"], "committing the checkpoint",
                          "in commit_checkpoint"),
}


def _plain_ranks(args: list[str], fault: str, logs, nproc: int = 2, timeout: float = 300) -> list[dict]:
    """Start one process per rank (RANK/WORLD_SIZE/MASTER_* as srun mode sets them); returns
    each rank's exit code, exit time and output."""
    port, procs = free_port(), []
    for rank in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FEDALIGN_DIST_FAULT=fault)
        log = open(logs / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(TRAIN + args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
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


def _fault_time(text: str) -> float:
    return float(re.search(r"injected fault at \w+ on rank 0 \(t=([0-9.]+)\)", text).group(1))


@pytest.mark.parametrize("point", sorted(SCENARIOS))
def test_rank0_failure_ends_plain_rank_processes_within_60s(tmp_path, tiny_overrides, point):
    extra, during, frame = SCENARIOS[point]
    ranks = _plain_ranks(tiny_overrides + extra + ["run.name=r", "fed.num_clients=4", "fed.clients_per_round=4",
                                                   "dist.timeout_s=600"], f"{point}@0", tmp_path)
    rank0, rank1 = ranks
    assert rank0["code"] != 0 and rank1["code"] != 0, [r["output"][-2000:] for r in ranks]
    t_fault = _fault_time(rank0["output"])
    assert max(r["end"] for r in ranks) - t_fault < 60, [r["end"] - t_fault for r in ranks]
    assert rank0["output"].count(frame) == 1 and f"RuntimeError: injected fault: {point}" in rank0["output"]
    assert f"rank 0 failed during {during}; rank 1 stops too" in rank1["output"]
    assert "Traceback" not in rank1["output"], rank1["output"][-2000:]


def test_rank0_failure_under_torchrun_shows_its_traceback_once(tmp_path, tiny_overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FEDALIGN_DIST_FAULT="checkpoint_commit@0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}"] + TRAIN[1:] + tiny_overrides + [
        "run.name=r", "strategy.name=fedavg", "checkpoint.every=1"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert time.time() - _fault_time(text) < 60
    assert text.count("in commit_checkpoint") == 1, text[-4000:]  # in torchrun's root-cause summary
    assert "rank 0 failed during committing the checkpoint" in text
    # nothing lost: the round's metrics were written before the checkpoint that failed
    assert (tmp_path / "r/metrics.jsonl").read_text().count('"round": 0') == 1
