"""Surviving failures: a rank killed mid-round under torchrun --max-restarts=1 costs at most
one round and changes nothing; damaged checkpoints are detected and skipped; a resumed run logs
each round once (runs of one rank in this process)."""
import re

import pytest
import torch
from safetensors.torch import load_file

import fedalign_dist as fd
from fedalign_dist import checkpoint
from tests.conftest import free_port
from tests.e2e.shared_runs import KILLED
from tests.faults import final_records, run_and_kill

TRAIN = ["-m", "fedalign_dist", "train", "--config", "configs/demo.yaml"]


def test_killed_rank_restarts_resumes_and_matches_uninterrupted_run(tmp_path, tiny_overrides, batch):
    out = run_and_kill(TRAIN + tiny_overrides + KILLED + ["run.name=killed"], tmp_path / "killed", free_port(),
                       kill_rank=1, after_rounds=2)
    assert out["killed_pid"] is not None, out["output"][-3000:]
    assert out["returncode"] == 0, out["output"][-5000:]
    # the kill lands once round 1 is logged; its checkpoint (written after its metrics line)
    # may or may not be committed by then
    resumed = re.search(r"resumed from round_(\d{5}): continuing at round (\d)", out["output"])
    assert resumed and resumed.group(1) in ("00000", "00001"), out["output"][-3000:]
    assert int(resumed.group(2)) == int(resumed.group(1)) + 1
    assert [r["round"] for r in final_records(tmp_path / "killed")] == [0, 1, 2, 3]
    clean = load_file(batch.run_dir("killed_clean") / "final/global.safetensors")  # the same run, uninterrupted
    resumed = load_file(tmp_path / "killed/final/global.safetensors")
    assert all(torch.equal(clean[k], resumed[k]) for k in clean), "resumed run differs from the clean run"


def _run(overrides):
    return fd.run(fd.load_config("configs/demo.yaml", overrides))


def test_corrupt_or_partial_latest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_overrides, capfd):
    common = tiny_overrides + ["run.name=r", "fed.rounds=3", "checkpoint.every=1", "checkpoint.keep=3"]
    _run(common)
    run = tmp_path / "r"
    assert [p.name for p in sorted((run / "checkpoints").glob("round_?????"))] == [
        "round_00000",
        "round_00001",
        "round_00002",
    ]
    assert checkpoint.latest_checkpoint(run).name == "round_00002"
    # flip one byte of the newest global state: its checksum no longer matches
    target = run / "checkpoints/round_00002/global.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    capfd.readouterr()
    assert checkpoint.latest_checkpoint(run).name == "round_00001"
    assert "round_00002 is unusable (global.safetensors does not match its checksum)" in capfd.readouterr().err
    # a partial one (no manifest yet) is skipped too
    (run / "checkpoints/round_00001/meta.json").unlink()
    assert checkpoint.latest_checkpoint(run).name == "round_00000"
    _run(common + ["run.resume=true"])
    assert "continuing at round 1" in "".join(capfd.readouterr())
    assert [r["round"] for r in final_records(run)] == [0, 1, 2]


def _tensorboard_steps(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_resume_leaves_each_round_once_in_metrics_and_tensorboard(tmp_path, tiny_overrides, capfd, monkeypatch):
    run, common = tmp_path / "r", tiny_overrides + ["run.name=r", "strategy.name=fedalign"]
    # rounds 0-2 logged, checkpoint after round 1 only: resuming re-runs round 2
    _run(common + ["fed.rounds=3", "checkpoint.every=2"])
    # resumed, round 2 logged again, then its checkpoint commit fails (metrics come first)
    monkeypatch.setenv("FEDALIGN_DIST_FAULT", "checkpoint_commit@0")
    with pytest.raises(RuntimeError, match="injected fault: checkpoint_commit"):
        _run(common + ["fed.rounds=4", "checkpoint.every=1", "run.resume=true"])
    monkeypatch.delenv("FEDALIGN_DIST_FAULT")
    assert [r["round"] for r in final_records(run)] == [0, 1, 2]
    capfd.readouterr()
    _run(common + ["fed.rounds=4", "checkpoint.every=1", "run.resume=auto"])
    assert "resumed from round_00001: continuing at round 2" in "".join(capfd.readouterr())
    assert [r["round"] for r in final_records(run)] == [0, 1, 2, 3]
    for tag in ("train_loss", "global_accuracy", "consistency_mean"):
        assert _tensorboard_steps(run, tag) == [0, 1, 2, 3], tag
