"""End-to-end runs of the real entry point: `fedalign-dist run` on 2 gloo ranks, and runs of
the shared 2-rank job (tests/e2e/shared_runs.py), tiny settings."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fedalign_dist as fd
from tests.conftest import REPO, TINY

REQUIRED = {"round", "strategy", "train_loss", "global_accuracy", "personalized_accuracy", "bytes_sent",
            "bytes_received", "time_local_s", "time_aggregate_s", "time_eval_s", "time_round_s", "peak_rss_mb"}


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_results_do_not_depend_on_client_placement(tmp_path, batch, one_thread):
    """1 rank x 4 clients (this process) and 2 ranks x 2 clients give the same global model."""
    fd.run(fd.load_config("configs/demo.yaml", TINY + ["fed.num_clients=4", "fed.clients_per_round=4",
                                                       "checkpoint.every=1", f"run.output_dir={tmp_path}",
                                                       "run.name=one"]))
    one_dir, two_dir = tmp_path / "one", batch.run_dir("placement_two")
    # Summation order differs (one all_reduce vs local sums): the first aggregation agrees to
    # float round-off; the next round's AdamW magnifies it where a gradient is ~0 or an
    # expert takes its first step (a first Adam step is lr-sized whatever the gradient).
    for saved, bound in (("checkpoints/round_00000/global.safetensors", 1e-6), ("final/global.safetensors", 1e-4)):
        one, two = load_file(one_dir / saved), load_file(two_dir / saved)
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(one[name], two[name], rtol=1e-3, atol=1e-4)
            assert (one[name] - two[name]).norm() <= bound * one[name].norm() + 1e-7, (saved, name)
    r1, r2 = _records(one_dir), _records(two_dir)
    assert r1[-1]["train_loss"] == pytest.approx(r2[-1]["train_loss"], rel=1e-5)
    assert r1[-1]["global_accuracy"] == pytest.approx(r2[-1]["global_accuracy"], abs=1e-9)


def test_how_often_a_run_evaluates_and_extending_it_by_resume_change_no_trained_weight(batch):
    """The demo's FedAlign-MoE on 2 ranks, 4 rounds: scored every round, at the default cadence
    (the last round only), and run for 2 rounds then extended to 4 by resume give bitwise the
    same weights and losses. Before, the placement counted evaluation work in the rounds that
    evaluate, so clients paired on ranks otherwise and the sums were taken in another order."""
    runs = {name: batch.run_dir(name) for name in ("cadence_every_round", "cadence_default", "cadence_extended")}
    states = {name: load_file(folder / "final/global.safetensors") for name, folder in runs.items()}
    reference = states.pop("cadence_every_round")
    for name, state in states.items():
        assert state.keys() == reference.keys()
        differ = [n for n in state if not torch.equal(state[n], reference[n])]
        assert not differ, f"{name}: {len(differ)} of {len(state)} tensors differ from the run scored every round"
    losses = {name: [r["train_loss"] for r in _records(folder)] for name, folder in runs.items()}
    assert losses["cadence_default"] == losses["cadence_every_round"] == losses["cadence_extended"]
    assert len(losses["cadence_extended"]) == 4
    # placement decided where clients trained (balanced: clients away from home; the same in all three)
    hosts = {name: [r["clients_per_rank"] for r in _records(folder)] for name, folder in runs.items()}
    assert hosts["cadence_default"] == hosts["cadence_every_round"]


@pytest.mark.parametrize("strategy", ["local", "fedalign"])
def test_balanced_placement_moves_personal_state_with_its_client(batch, strategy):
    """Balanced placement trains clients away from their home rank; their personal state
    (local-only: the whole model) moves with them, so every number equals the run with fixed
    home blocks (6 clients, 3 per round, 4 rounds)."""
    blocks, balanced = (_records(batch.run_dir(f"placement_{strategy}_{how}")) for how in ("blocks", "balanced"))
    homes = lambda r: [sorted(c // 3 for c in on_rank) for on_rank in r["clients_per_rank"]]  # noqa: E731
    assert any(homes(r) != [[0] * len(r["clients_per_rank"][0]), [1] * len(r["clients_per_rank"][1])]
               for r in balanced), "no client trained away from its home rank"
    assert all(r["state_bytes_moved"] == 0 for r in blocks)
    if strategy == "local":  # every trained client keeps a model (fedalign: only its excluded experts)
        assert any(r["state_bytes_moved"] > 0 for r in balanced)
    assert all(max(map(len, r["clients_per_rank"])) == 2 for r in balanced)  # 3 equal clients: 2 + 1
    for a, b in zip(blocks, balanced):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["personalized_accuracy"] == pytest.approx(b["personalized_accuracy"], abs=1e-9)


def test_demo_two_ranks_writes_the_run_folder(tmp_path, tiny_overrides):
    out = subprocess.run([sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config",
                          "configs/demo.yaml", *tiny_overrides, "run.name=demo", "checkpoint.every=1",
                          "checkpoint.keep=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    run = tmp_path / "demo"
    records = _records(run)
    assert [r["round"] for r in records] == [0, 1]
    assert all(REQUIRED <= r.keys() for r in records)
    assert all(r["bytes_sent"] > 0 and len(r["bytes_sent_per_rank"]) == 2 for r in records)
    # communication is timed inside the collectives, as part of the aggregation time
    assert all(0 < r["time_comm_s"] <= r["time_aggregate_s"] for r in records)
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine_inits_per_rank"] == [1, 1]
    checkpoints = sorted((run / "checkpoints").glob("round_?????"))
    assert [c.name for c in checkpoints] == ["round_00001"]  # keep=1 pruned round 0
    torch.testing.assert_close(load_file(checkpoints[0] / "global.safetensors"),
                               load_file(run / "final/global.safetensors"))
    final = load_file(run / "final/global.safetensors")
    assert any("mlp.experts.gate_up_proj" in k for k in final) and any("mlp.gate.weight" in k for k in final)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(run / "final/model")
    key = next(k for k in final if k.endswith("mlp.gate.weight"))
    torch.testing.assert_close(model.state_dict()[key], final[key])
    assert "round   1 | fedalign" in out.stdout + out.stderr
    report = subprocess.run([sys.executable, "-m", "fedalign_dist", "report", str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    summary_md = (run / "summary.md").read_text()
    assert "| strategy | fedalign |" in summary_md and "| 1 |" in summary_md
    assert {p.name for p in (run / "report").iterdir()} == {"accuracy.png", "alignment.png", "routing.png"}


def test_lora_fedprox_zero2_run_saves_a_loadable_peft_adapter(batch):
    final = batch.run_dir("lora_fedprox_zero2") / "final"  # qwen3_moe, 2 ranks
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(final / "base_model")
    model = PeftModel.from_pretrained(base, final / "adapter")
    saved = load_file(final / "global.safetensors")
    live = dict(model.named_parameters())
    lora_keys = [k for k in saved if "lora_B" in k]
    assert lora_keys and all(torch.equal(live[k], saved[k]) for k in lora_keys)
    assert any(saved[k].abs().sum() > 0 for k in lora_keys), "LoRA B never moved from zero"
    router = next(k for k in saved if "mlp.gate" in k)
    assert torch.equal(live[router], saved[router])


def test_local_only_and_model_path(batch):
    """model.path loads a local checkpoint (an OLMoE saved by tests/e2e/shared_runs.py);
    local-only keeps per-client weights on disk and sends nothing."""
    import yaml
    run = batch.run_dir("local_model_path")
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (saved["family"], saved["num_experts"], saved["top_k"], saved["preset"]) == ("olmoe", 4, 2, None)
    loaded = json.loads((run / "model.json").read_text())
    assert (loaded["model_type"], loaded["num_experts"], loaded["top_k"], loaded["compute_dtype"]) == \
        ("olmoe", 4, 2, "float32")
    stored = list((run / "clients").rglob("*.safetensors"))
    assert stored, "local-only clients kept no state"
    records = _records(run)
    assert all(r["bytes_sent"] == 0 and len(r["bytes_sent_per_rank"]) == 2 for r in records)
