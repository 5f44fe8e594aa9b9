"""One diverged client (a real learning rate of 1e20, for that client only, through the test
fault hook) is left out on every rank and logged; the global model stays finite, for every
aggregation path (the shared 2-rank job). A global state that overflows, or a round whose
every client is rejected, stops the run without a final model."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fedalign_dist as fd
from fedalign_dist import checkpoint
from tests.conftest import REPO, TINY
from tests.e2e.shared_runs import GUARDED


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(GUARDED))
def test_diverged_client_is_rejected_and_the_model_stays_finite(batch, method):
    # clients 0, 1 on rank 0 and 2, 3 on rank 1; client 2 diverges in every round
    run = batch.run_dir(f"guard_{method}")
    records = _records(run)
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        assert r["rejected_clients"] == [2] and r["num_rejected"] == 1 and r["num_clients_trained"] == 4
        assert r["rejected_reasons"]["2"].startswith("non-finite")
        assert all(r[k] is not None and r[k] == r[k] for k in ("train_loss", "global_accuracy",
                                                               "personalized_accuracy"))
    assert "WARNING: round 1: client 2 left out of aggregation: non-finite" in batch.log(f"guard_{method}")
    final = load_file(run / "final/global.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    # no personal state (personal experts, local weights) was updated from the diverged client
    states = [path for folder in run.glob("checkpoints/round_?????")
              for path, _ in checkpoint.client_entries(folder).values()]
    assert states or not method.startswith("fedalign"), "no personal experts were checkpointed"
    for path in states:
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_global_accuracy"] == records[-1]["global_accuracy"]


def test_overflowing_global_state_stops_the_run_without_a_final_model(tmp_path, tiny_overrides, batch, monkeypatch):
    # finite but huge: the guard lets it through (no norm bound), the sum overflows to inf; on
    # 2 ranks (the shared job) every rank stops with the error
    error = batch.error("guard_overflow")
    assert error and "the global state became non-finite in round 0" in error and "guard.max_update_norm" in error
    run = batch.output_dir / "guard_overflow"
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()
    # with a norm bound the same client is rejected (or clipped) and the run finishes (one rank, here)
    monkeypatch.setenv("FEDALIGN_DIST_FAULT", "huge_delta_client=2")
    for action in ("reject", "clip"):
        fd.run(fd.load_config("configs/demo.yaml", tiny_overrides + [
            f"run.name={action}", "strategy.name=fedavg", "fed.num_clients=4", "fed.clients_per_round=4",
            "guard.max_update_norm=1000", f"guard.on_large_update={action}"]))
        r = _records(tmp_path / action)[-1]
        assert (r["num_rejected"], r["num_clipped"]) == ((1, 0) if action == "reject" else (0, 1))
        assert all(torch.isfinite(t).all() for t in load_file(tmp_path / action / "final/global.safetensors").values())


def test_a_round_whose_every_client_is_rejected_stops_the_run(tmp_path):
    # the user's command with a learning rate that diverges every client: the old code went on,
    # exited 0 with the untrained model as final/ and wrote NaN into summary.json
    out = subprocess.run([sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config", "configs/demo.yaml",
                          "local.lr=1e6", *TINY, f"run.output_dir={tmp_path}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "the update guard rejected every sampled client in round 0" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "WARNING: round 0: client" in out.stdout
    run = tmp_path / "demo"
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()
