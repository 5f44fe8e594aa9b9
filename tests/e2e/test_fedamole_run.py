"""FedAMoLE end to end: 2 gloo ranks (the shared job), a tiny dense Llama with AMoLE adapters,
clients on both ranks holding different expert sets chosen by reverse selection; its LoRA
FedAvg baseline on one rank (this process)."""
import json

import torch
from safetensors.torch import load_file

import fedalign_dist as fd


def test_fedamole_two_ranks(batch):
    run = batch.run_dir("amole")  # 4 clients on 2 ranks, 6 experts of rank 4, at most 4 held
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert all(r["held_experts_mean"] == 3.0 and r["upload_bytes_per_client"] > r["download_bytes_per_client"] > 0
               for r in records)
    assert all(r["global_accuracy"] is not None and r["personalized_accuracy"] is not None for r in records)
    # strategy state is data only: safetensors (+ JSON), never a pickle
    assert not list(run.glob("checkpoints/*/strategy.pt"))
    state = load_file(run / "checkpoints/round_00001/strategy.safetensors")
    x = state["assignment"]  # (layers, E, clients); clients 0, 1 on rank 0 and 2, 3 on rank 1
    assert x.shape == (4, 6, 4) and (x.sum(2) == 2).all()
    assert any(not torch.equal(x[:, :, a], x[:, :, b]) for a in (0, 1) for b in (2, 3))
    final = load_file(run / "final/global.safetensors")
    assert any(k.endswith("experts_A") for k in final) and not any("base.weight" in k for k in final)
    # the result reloads: the run's own model (rebuilt from its saved config and global state)
    # and the documented loader give the same logits, globally and with a client's experts
    from fedalign_dist.config import load_config
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.models.amole import set_held
    from fedalign_dist.models.amole_io import load_fedamole
    from fedalign_dist.strategies import build_run_model as build_model
    assert not (run / "final/model").exists() and (run / "final/base_model/config.json").is_file()
    cfg = load_config(run / "config.yaml")
    rebuilt, _ = build_model(cfg, build_tokenizer(cfg.data.tokenizer, cfg.model.path))
    rebuilt.load_state_dict(final, strict=False)
    rebuilt.eval()
    assignment = load_file(run / "final/amole/assignment.safetensors")["held"].bool()
    assert torch.equal(assignment, load_file(run / "checkpoints/round_00001/strategy.safetensors")["assignment"].bool())
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for client in (None, 0, 3):
        set_held(rebuilt, None if client is None else assignment[:, :, client])
        with torch.no_grad():
            assert torch.equal(
                load_fedamole(run / "final", client)(input_ids=ids).logits, rebuilt(input_ids=ids).logits
            )


def test_fedavg_with_one_lora_on_the_same_dense_base(tmp_path, tiny_overrides):
    """The baseline FedAMoLE is compared with: one PEFT LoRA per q_proj / v_proj, FedAvg."""
    fd.run(fd.load_config("configs/fedamole.yaml", [*tiny_overrides, "run.name=lora", "strategy.name=fedavg",
                                                    "model.finetune=lora", "model.lora.rank=8", "fed.rounds=1"]))
    final = load_file(tmp_path / "lora/final/global.safetensors")
    assert final and all("lora_" in k for k in final)
    assert (tmp_path / "lora/final/adapter/adapter_config.json").is_file()
