"""One diverged client (a real learning rate of 1e20, for that client only, through the test
fault hook) is left out on every rank and logged; the global model stays finite, for every
aggregation path. A global state that overflows stops the run without a final model."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedalign_dist import checkpoint
from tests.conftest import REPO, free_port

TRAIN = ["-m", "fedalign_dist", "train", "--config", "configs/demo.yaml"]
METHODS = {
    "fedavg": ["strategy.name=fedavg"],
    "fedmoe": ["strategy.name=fedmoe"],
    "fedalign_reduce": ["strategy.name=fedalign", "strategy.fedalign.comm=reduce", "strategy.fedalign.beta=0",
                        "strategy.fedalign.similarity_floor=1"],
    "fedalign_allgather": ["strategy.name=fedalign", "strategy.fedalign.comm=allgather",
                           "strategy.fedalign.mode=pairwise", "strategy.fedalign.beta=0",
                           "strategy.fedalign.similarity_floor=1"],
    "fedamole": ["strategy.name=fedamole", "model.family=llama", "strategy.fedamole.num_experts=6",
                 "strategy.fedamole.rank=4", "strategy.fedamole.max_experts=4"],
}


def _torchrun(args, fault, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FEDALIGN_DIST_FAULT=fault)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}"] + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_diverged_client_is_rejected_and_the_model_stays_finite(tmp_path, tiny_overrides, method):
    # clients 0, 1 on rank 0 and 2, 3 on rank 1; client 2 diverges in every round
    out = _torchrun(TRAIN + tiny_overrides + METHODS[method] + [
        "run.name=r", "fed.num_clients=4", "fed.clients_per_round=4", "checkpoint.every=1",
        "fed.client_state=disk"], fault="diverge_client=2")
    assert out.returncode == 0, out.stderr[-5000:]
    run = tmp_path / "r"
    records = _records(run)
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        assert r["rejected_clients"] == [2] and r["num_rejected"] == 1 and r["num_clients_trained"] == 4
        assert r["rejected_reasons"]["2"].startswith("non-finite")
        assert all(r[k] is not None and r[k] == r[k] for k in ("train_loss", "global_accuracy",
                                                               "personalized_accuracy"))
    assert "WARNING: round 1: client 2 left out of aggregation: non-finite" in out.stdout + out.stderr
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


def test_overflowing_global_state_stops_the_run_without_a_final_model(tmp_path, tiny_overrides):
    # finite but huge: the guard lets it through (no norm bound), the sum overflows to inf
    out = _torchrun(TRAIN + tiny_overrides + ["run.name=r", "strategy.name=fedavg", "fed.num_clients=4",
                                              "fed.clients_per_round=4"], fault="huge_delta_client=2")
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "the global state became non-finite in round 0" in text and "guard.max_update_norm" in text
    run = tmp_path / "r"
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()
    # with a norm bound the same client is rejected (or clipped) and the run finishes
    for action in ("reject", "clip"):
        out = _torchrun(TRAIN + tiny_overrides + [f"run.name={action}", "strategy.name=fedavg", "fed.num_clients=4",
                                                  "fed.clients_per_round=4", "guard.max_update_norm=1000",
                                                  f"guard.on_large_update={action}"], fault="huge_delta_client=2",
                        nproc=1)
        assert out.returncode == 0, out.stderr[-3000:]
        r = _records(tmp_path / action)[-1]
        assert (r["num_rejected"], r["num_clipped"]) == ((1, 0) if action == "reject" else (0, 1))
        assert all(torch.isfinite(t).all() for t in load_file(tmp_path / action / "final/global.safetensors").values())
