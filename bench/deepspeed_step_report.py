"""What each part of DeepSpeed's step costs a client's local training, on the speed issue's
workload (the tiny Mixtral preset, 8 experts top-2, byte tokens, sequences of 64, batch 8,
AdamW lr 1e-3, gradient clipping 1.0), in one process: the same batches through

  full step + throughput timer   DeepSpeed's whole path (the trainer before the change)
  full step                      the throughput timer off
  no gradient all-reduce         and the size-1 gradient all-reduce skipped
  lean (the trainer now)         and clipping by torch.nn.utils.clip_grad_norm_
  plain torch                    AdamW + clip_grad_norm_, no engine (the floor)

The variants alternate (the machine is noisy: compare ratios within one run). Each starts
from the same weights and reset optimizer; the weights after the steps are compared with
plain torch's.

    python bench/deepspeed_step_report.py [--steps 20] [--repeats 5]     # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedalign_dist.benchmark.systems import OVERHEAD_WORKLOAD  # noqa: E402
from fedalign_dist.clients import trainer as trainer_module  # noqa: E402
from fedalign_dist.clients.trainer import LocalTrainer, StepPath, client_batches  # noqa: E402
from fedalign_dist.config import load_config  # noqa: E402
from fedalign_dist.data.federated import build_federated_data  # noqa: E402
from fedalign_dist.data.tokenizer import build_tokenizer  # noqa: E402
from fedalign_dist.distributed.env import end_checked_rank, init_distributed  # noqa: E402
from fedalign_dist.models.build import build_model  # noqa: E402
from fedalign_dist.train import quiet_libraries  # noqa: E402


def with_throughput_timer(build):
    def config(cfg, path=None):
        out = build(cfg, path)
        out.pop("timers", None)  # DeepSpeed's default: the timer on
        return out
    return config


class PlainTorch:
    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def load_state(self, state):
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name])
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=self.cfg.local.lr,
                                           weight_decay=self.cfg.local.weight_decay)

    def reset_optimizer(self):
        pass

    def train(self, batches, loss_fn, regularizer):
        self.model.train()
        for batch in batches:
            objective, _ = loss_fn(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.local.grad_clip)
            self.optimizer.step()

    def read_state(self):
        return {n: p.detach().clone() for n, p in self.params.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="local steps per timed client")
    parser.add_argument("--repeats", type=int, default=5, help="alternated timings of every variant")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    cfg = load_config(None, OVERHEAD_WORKLOAD + ["local.grad_clip=1.0"])
    env = init_distributed("gloo")
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.model.path)
    data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, tokenizer)
    aux = None

    def fresh_model():
        torch.manual_seed(0)
        return build_model(cfg, tokenizer)[0]

    built = trainer_module.deepspeed_config
    trainer_module.deepspeed_config = with_throughput_timer(built)
    variants = {"full step + throughput timer": LocalTrainer(fresh_model(), cfg, env.device, StepPath.full())}
    trainer_module.deepspeed_config = built
    variants["full step"] = LocalTrainer(fresh_model(), cfg, env.device, StepPath.full())
    variants["no gradient all-reduce"] = LocalTrainer(fresh_model(), cfg, env.device,
                                                      StepPath(backward_allreduce=False, deepspeed_clipping=True))
    variants["lean (the trainer now)"] = LocalTrainer(fresh_model(), cfg, env.device)
    assert variants["lean (the trainer now)"].path == StepPath(backward_allreduce=False, deepspeed_clipping=False)
    plain_model = fresh_model()
    variants["plain torch"] = PlainTorch(plain_model, cfg)
    aux = float(getattr(plain_model.config, "router_aux_loss_coef", 0.0))
    start = PlainTorch(plain_model, cfg).read_state()
    train_idx = data.clients[0]["train"]

    def run(trainer, round_idx):
        trainer.load_state(start)
        trainer.reset_optimizer()
        batches = list(client_batches(data, train_idx, args.steps, cfg.local.batch_size, cfg.seed, round_idx, 0))
        t0 = time.perf_counter()
        trainer.train(batches, lambda m, b: (data.task.loss(m, b, aux),) * 2, lambda p: None)
        return (time.perf_counter() - t0) / args.steps, trainer.read_state()

    for trainer in variants.values():
        run(trainer, 0)  # warm-up
    ms = {name: [] for name in variants}
    finals = {}
    for repeat in range(args.repeats):
        for name, trainer in variants.items():
            seconds, finals[name] = run(trainer, 1)
            ms[name].append(1000 * seconds)
    floor = statistics.median(ms["plain torch"])
    print(f"{args.steps} steps x {args.repeats} repeats, median ms per step (ratio to plain torch); "
          f"max |weight - plain torch's| after the steps")
    for name in variants:
        diff = max(float((finals[name][n].float() - finals["plain torch"][n].float()).abs().max()) for n in start)
        median = statistics.median(ms[name])
        print(f"  {name:30s} {median:7.1f} ms  ({median / floor:.2f}x)   {diff:.3g}")


if __name__ == "__main__":
    main()
    end_checked_rank()  # not interpreter finalization, which can abort a finished rank
