"""The GPU path: real jobs under torchrun with NCCL and deepspeed.bf16 on CUDA devices.

    bash tests/gpu/run.sh        # on a machine with 1+ CUDA GPUs; prints a table at the end

Skipped without CUDA. Two ranks where the node has two GPUs; with one GPU the same jobs run
on one rank (NCCL cannot place two ranks on one device). FEDALIGN_GPU_TESTS_ON_CPU=1 runs the
same tests with gloo on CPU, to check the tests themselves on a machine without a GPU.
Each job's numbers (ranks, round seconds, peak GPU memory per rank) are appended to
$FEDALIGN_GPU_REPORT (a JSON-lines file) when it is set."""
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import torchrun

ON_CPU = os.environ.get("FEDALIGN_GPU_TESTS_ON_CPU") == "1"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS == 0 and not ON_CPU,
                                reason="needs a CUDA GPU (NCCL and bf16 on device): run `bash tests/gpu/run.sh` there")
NPROC = 2 if ON_CPU else min(2, GPUS)
BACKEND = "gloo" if ON_CPU else "nccl"
TRAIN = ["-m", "fedalign_dist", "train", "--config", "configs/demo.yaml"]


def _run(tmp_path, name, *overrides):
    """One bf16 job; returns its metrics records after checking the outputs every run has."""
    common = [f"run.output_dir={tmp_path}", f"run.name={name}", f"dist.backend={BACKEND}", "deepspeed.bf16=true",
              "data.max_examples=400", "data.min_client_examples=5", "fed.rounds=2", "local.steps=3",
              "local.batch_size=4", "eval.batch_size=64", "eval.every=1", "fed.num_clients=4",
              "fed.clients_per_round=4"]
    t0 = time.perf_counter()
    torchrun(TRAIN + common + list(overrides), nproc=NPROC)
    wall = time.perf_counter() - t0
    run = tmp_path / name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert all(r["train_loss"] == r["train_loss"] and r["global_accuracy"] is not None for r in records)
    assert json.loads((run / "summary.json").read_text())["world_size"] == NPROC
    model = json.loads((run / "model.json").read_text())
    if not ON_CPU:
        assert len(records[-1]["peak_gpu_mb_per_rank"]) == NPROC
        assert all(mb > 0 for mb in records[-1]["peak_gpu_mb_per_rank"])
    report = os.environ.get("FEDALIGN_GPU_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"job": name, "ranks": NPROC, "backend": BACKEND, "wall_s": round(wall, 1),
                                "round_s": [round(r["time_round_s"], 3) for r in records],
                                "peak_gpu_mb_per_rank": records[-1].get("peak_gpu_mb_per_rank"),
                                "global_accuracy": records[-1]["global_accuracy"], "model": model}) + "\n")
    return records


def test_fedavg_bf16(tmp_path):
    _run(tmp_path, "fedavg", "strategy.name=fedavg")
    final = load_file(tmp_path / "fedavg/final/global.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values())


@pytest.mark.parametrize("comm", ["reduce", "allgather"])
def test_fedalign_bf16_both_comm_paths(tmp_path, comm):
    records = _run(tmp_path, f"fedalign_{comm}", "strategy.name=fedalign", f"strategy.fedalign.comm={comm}")
    assert all(0 <= r["aligned_fraction"] <= 1 and r["consistency_mean"] > 0 for r in records)


def test_fedamole_bf16(tmp_path):
    from fedalign_dist.models.amole_io import load_fedamole
    records = _run(tmp_path, "fedamole", "strategy.name=fedamole", "model.family=llama",
                   "strategy.fedamole.num_experts=6", "strategy.fedamole.rank=4", "strategy.fedamole.max_experts=4")
    assert all(r["held_experts_mean"] > 0 for r in records)
    model = load_fedamole(tmp_path / "fedamole/final", client=0)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_updates_below_one_bf16_step_survive(tmp_path):
    """lr 1e-6: every update is smaller than bf16 can represent next to the weights; the
    global state must still move (fp32 masters), by less than one bf16 step."""
    _run(tmp_path, "small_updates", "strategy.name=fedavg", "local.lr=1e-6", "checkpoint.every=1",
         "checkpoint.keep=2")
    run = tmp_path / "small_updates"
    first = load_file(run / "checkpoints/round_00000/global.safetensors")
    final = load_file(run / "final/global.safetensors")
    moved = sum(int((final[n] != first[n]).sum()) for n in final) / sum(t.numel() for t in final.values())
    assert moved > 0.3, f"round 1 moved only {moved:.3f} of the global weights"
    assert max(float((final[n] - first[n]).abs().max()) for n in final) < 1e-4


# Not on one GPU: NCCL refuses two ranks on one device, and gloo has no all_gather or
# reduce_scatter for CUDA tensors, which ZeRO-3 needs.
@pytest.mark.skipif(NPROC < 2, reason="a client group needs 2 ranks, each on its own GPU: run on a node with 2 GPUs")
@pytest.mark.parametrize("bf16", ["true", "false"])
def test_a_client_group_of_two_ranks_trains_one_client_sharded(tmp_path, bf16):
    """fed.ranks_per_client=2: both ranks hold half of each client's model under ZeRO-3 (bf16
    slices with fp32 masters, or fp32), each parameter cut into slices before the engine starts
    (the whole model never on one GPU), and the export reloads to the last global state."""
    from transformers import AutoModelForCausalLM
    name = f"group_of_2_bf16_{bf16}"
    _run(tmp_path, name, "strategy.name=fedavg", f"deepspeed.bf16={bf16}", "fed.ranks_per_client=2")
    run = tmp_path / name
    final = load_file(run / "final/global.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(run / "final/model", dtype=torch.float32)
    params = dict(reloaded.named_parameters())
    for name, value in final.items():  # the fp32 global state, also under bf16
        assert torch.equal(params[name].detach(), value), f"the export differs at {name}"
