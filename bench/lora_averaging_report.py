"""How much does averaging LoRA experts factor by factor (mean A, mean B) differ from averaging
the updates they make (mean of B A)? Measured on a federated LoRA fine-tune of the demo's
model and data (tiny Mixtral, BBC News, Dirichlet 0.5), FedAvg over every client each round.

    python bench/lora_averaging_report.py [--rounds 6] [--lr 5e-3] [--steps 20]   # ~3 min on 2 cores

A LoRA on a randomly initialised model learns nothing measurable, so the base is first
trained centrally in full for --warmup-steps on the pooled training data (a stand-in for a
pretrained MoE, issue 16). Clients train in this process with the project's own model, LoRA, batches and loss (plain
torch AdamW with the run's lr, weight decay and clipping, instead of one DeepSpeed engine),
each from the global state. Each round prints, over every per-expert LoRA:
  rel_error    ||scale * (mean B)(mean A) - mean(scale * B_i A_i)|| / ||mean(scale * B_i A_i) - start||
               (the error relative to the size of the round's aggregated update)
  accuracy / answer perplexity of the two global models on the pooled test split: the
               factor-wise one (what the framework keeps) and the exact one (mean update
               merged into the expert weights).
The run continues from the factor-wise global state, as the framework does.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedalign_dist.clients.trainer import client_batches  # noqa: E402
from fedalign_dist.config import load_config  # noqa: E402
from fedalign_dist.data.federated import build_federated_data  # noqa: E402
from fedalign_dist.data.tokenizer import build_tokenizer  # noqa: E402
from fedalign_dist.models.build import build_model  # noqa: E402

CPU = torch.device("cpu")


def lora_wrappers(model):
    import peft
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.ParamWrapper)]


def deltas(model, state) -> list[torch.Tensor]:
    """Every wrapper's weight-space update scale * B A (per expert) under `state`."""
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return [m.get_delta_weight("default").detach().clone() for m in lora_wrappers(model)]


def merged_model(model, state, exact: list[torch.Tensor]):
    """A copy whose expert weights carry the exact mean update, with the LoRA switched off."""
    merged = copy.deepcopy(model)
    merged.load_state_dict(state, strict=False)
    with torch.no_grad():
        for module, delta in zip(lora_wrappers(merged), exact):
            module.get_param().add_(delta)
            module.lora_B["default"].weight.zero_()
    return merged


def train_client(model, cfg, data, state, round_idx, client_id, aux_coef):
    model.load_state_dict(state, strict=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.local.lr, weight_decay=cfg.local.weight_decay)
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, round_idx, client_id]).generate_state(1)[0]))
    for batch in client_batches(data, data.clients[client_id]["train"], cfg.local.steps, cfg.local.batch_size,
                                cfg.seed, round_idx, client_id):
        loss = data.task.loss(model, batch, aux_coef)
        optim.zero_grad()
        loss.backward()
        if cfg.local.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.local.grad_clip)
        optim.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(2)
    demo = Path(__file__).resolve().parents[1] / "configs/demo.yaml"
    base_cfg = load_config(demo, ["model.finetune=full", f"local.steps={args.warmup_steps}"])
    tokenizer = build_tokenizer(base_cfg.data.tokenizer, None)
    data = build_federated_data(base_cfg.data, base_cfg.fed.num_clients, base_cfg.seed, tokenizer)
    base, _ = build_model(base_cfg, tokenizer)
    data.clients.append({"train": data.pooled("train")})  # the central warm-up's "client"
    train_client(base, base_cfg, data, {}, 0, len(data.clients) - 1, 0.0)
    data.clients.pop()
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        cfg = load_config(demo, [f"model.path={folder}", "model.finetune=lora", f"model.lora.rank={args.rank}",
                                 "strategy.name=fedavg", f"local.lr={args.lr}", f"local.steps={args.steps}"])
        model, _ = build_model(cfg, tokenizer)
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0))
    test = np.sort(np.random.default_rng(0).choice(data.pooled("test"), args.eval_examples, replace=False))
    examples = data.examples_at(test)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    weights = torch.tensor([data.num_train(c) for c in range(cfg.fed.num_clients)], dtype=torch.float64)
    weights = (weights / weights.sum()).float()
    print(f"{cfg.fed.num_clients} clients, LoRA rank {args.rank} on every expert, lr {args.lr}, "
          f"{args.steps} local steps, {args.eval_examples} test examples\n")
    print("| round | rel_error | update norm | accuracy factor-wise | accuracy exact | ppl factor-wise | ppl exact |")
    print("|---|---|---|---|---|---|---|")
    for round_idx in range(args.rounds):
        start = deltas(model, state)
        trained = [train_client(model, cfg, data, state, round_idx, c, aux_coef) for c in range(cfg.fed.num_clients)]
        factor_state = {n: sum(w * t[n] for w, t in zip(weights, trained)) for n in state}
        client_deltas = [deltas(model, t) for t in trained]
        exact = [sum(w * d[k] for w, d in zip(weights, client_deltas)) for k in range(len(start))]
        factor = deltas(model, factor_state)
        err = torch.sqrt(sum(((f - x) ** 2).sum() for f, x in zip(factor, exact)))
        size = torch.sqrt(sum(((x - s) ** 2).sum() for x, s in zip(exact, start)))
        exact_model = merged_model(model, factor_state, exact)
        model.load_state_dict(factor_state, strict=False)
        if round_idx == 0:  # the merge path itself is exact: merging the factor-wise update changes nothing
            ids = torch.tensor([examples[0]["prompt"]])
            with torch.no_grad():
                same = merged_model(model, factor_state, factor)(input_ids=ids).logits
                torch.testing.assert_close(same, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        got_f = data.task.summarise(data.task.evaluate_sums(model, examples, cfg.eval.batch_size, CPU))
        got_x = data.task.summarise(data.task.evaluate_sums(exact_model, examples, cfg.eval.batch_size, CPU))
        print(f"| {round_idx} | {float(err / size):.4f} | {float(size):.4f} | {got_f['accuracy']:.3f} | "
              f"{got_x['accuracy']:.3f} | {got_f['perplexity']:.3f} | {got_x['perplexity']:.3f} |", flush=True)
        state = factor_state


if __name__ == "__main__":
    main()
