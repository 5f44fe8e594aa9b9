"""Local training through ONE DeepSpeed engine per rank, reused for every client it hosts.

A client's starting weights are copied into the live engine in place (ZeRO-1/2 parameters
are views into flat buffers: rebinding `.data` would be lost), then the optimizer's fp32
master copies are refreshed and its state reset."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fedalign_dist.clients.solo_mpu import SoloMPU

NamedTensors = dict[str, torch.Tensor]


def deepspeed_config(cfg) -> dict:
    return {
        "train_batch_size": cfg.local.batch_size,  # dp size 1: micro batch x grad accumulation
        "train_micro_batch_size_per_gpu": cfg.local.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.local.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class LocalTrainer:
    engine_inits = 0

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device):
        import deepspeed
        self.cfg, self.device = cfg, device
        model.to(device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.local.lr, weight_decay=cfg.local.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg), mpu=SoloMPU())
        LocalTrainer.engine_inits += 1
        self.params = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def load_state(self, state: NamedTensors) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state[name])
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        inner = self.engine.optimizer
        while not isinstance(inner, torch.optim.Optimizer):
            inner = inner.optimizer
        return inner

    def reset_optimizer(self) -> None:
        self._torch_optimizer().state.clear()  # AdamW re-creates its moments lazily at the next step

    def set_lr(self, lr: float) -> None:
        for group in self._torch_optimizer().param_groups:
            group["lr"] = lr

    def read_state(self) -> NamedTensors:
        return {n: p.detach().float().cpu().clone() for n, p in self.params.items()}

    def train(self, batches, loss_fn: Callable, regularizer: Callable[[dict], torch.Tensor | None]) -> float:
        """Run one client's local steps; returns the mean task loss (aux loss included).
        `loss_fn(model, batch)` returns (objective to minimise, task loss to report), both
        computed through the engine; `regularizer(params)` may add a parameter-space term."""
        self.engine.train()
        losses = []
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            objective, task_loss = loss_fn(self.engine, batch)
            extra = regularizer(self.params)
            self.engine.backward(objective if extra is None else objective + extra)
            self.engine.step()
            losses.append(float(task_loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")


def client_batches(task, prompts, labels, train_idx: np.ndarray, steps: int, batch_size: int,
                   seed: int, round_idx: int, client_id: int):
    """The client's batches for one round: seeded by (seed, round, client) only, so results
    do not depend on which rank hosts the client."""
    rng = np.random.default_rng([seed, round_idx, client_id, 0xBA7C])
    need = steps * batch_size
    order = np.concatenate([rng.permutation(train_idx) for _ in range(-(-need // len(train_idx)))])[:need]
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        yield task.train_batch([prompts[i] for i in idx], [int(labels[i]) for i in idx])
