"""A failure on one rank ends every rank of the job promptly, non-zero, with the failing
rank's traceback shown once: started as plain processes (one per rank, as `srun` starts them,
with no agent to kill the others), under torchrun, and under `fedalign-dist run` (without
torchrun's report). Ctrl-C on `fedalign-dist run` stops every rank quietly and prints the
command that continues the run."""
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


def test_fedalign_run_reports_a_rank_failure_once_without_torchruns_report(tmp_path, tiny_overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FEDALIGN_DIST_FAULT="checkpoint_commit@0")
    out = subprocess.run([sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", "configs/demo.yaml",
                          *tiny_overrides, "run.name=r", "strategy.name=fedavg", "checkpoint.every=1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-4000:]
    assert text.count("in commit_checkpoint") == 1 and "rank 0 exited with code 1" in text, text[-4000:]
    for noise in ("ChildFailedError", "Root Cause", "error_file", "Setting accelerator to CPU", "built successfully"):
        assert noise not in text, (noise, text[-4000:])


def test_ctrl_c_stops_every_rank_quietly_and_prints_the_command_that_resumes(tmp_path, tiny_overrides):
    import signal

    from tests.faults import _children
    args = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", "configs/demo.yaml",
            *tiny_overrides, "fed.rounds=500", "checkpoint.every=1", "run.name=r", "strategy.name=fedavg"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # its own process group with SIGINT at its default, as a terminal's foreground job (a shell
    # starts background jobs with SIGINT ignored, and Python then leaves it ignored)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    # any committed checkpoint (a tiny round takes a fraction of a second: round 1's is pruned
    # by round 3's within a poll)
    while not list((tmp_path / "r/checkpoints").glob("round_?????")) and time.time() < deadline:
        time.sleep(0.1)
    ranks = [pid for child in _children(proc.pid) for pid in [child, *_children(child)]]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: every process of the group gets SIGINT
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text[-4000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    assert "interrupted; every rank stopped" in text and "keeps checkpoint round_000" in text
    assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}") and
                open(f"/proc/{pid}/stat").read().split()[2] != "Z"], "a rank outlived the launcher"
    resume = text.strip().splitlines()[-1].split()
    assert resume[:2] == ["fedalign-dist", "run"] and resume[-1] == "run.resume=true"
    rerun = [sys.executable, "-m", "fedalign_dist", *resume[1:-1], "fed.rounds=4", "run.resume=true"]
    done = subprocess.run(rerun, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resumed from round_000" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_a_rank_killed_from_outside_ends_the_run_and_is_named_as_the_cause(tmp_path, tiny_overrides):
    """SIGKILL (the OOM killer, a user's kill) leaves no error file: the launcher names the
    killed rank, not the peer that then failed on the broken connection, and stops that peer."""
    import signal

    from tests.faults import _children, _rank_of, rounds_logged
    args = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", "configs/demo.yaml",
            *tiny_overrides, "fed.rounds=500", "run.name=r", "strategy.name=fedavg"]  # never finishes first
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while rounds_logged(tmp_path / "r") < 1 and time.time() < deadline:
        time.sleep(0.2)
    ranks = _children(proc.pid)
    victim = next(pid for pid in ranks if _rank_of(pid) == 1)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, text[-4000:]
    assert time.time() - killed_at < 40  # the peer ends by itself, or is stopped after 10 + 10 s
    assert "the run failed: rank 1 exited with code -9 (killed by SIGKILL)" in text, text[-4000:]
    assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}") and
                open(f"/proc/{pid}/stat").read().split()[2] != "Z"], "a rank outlived the launcher"
