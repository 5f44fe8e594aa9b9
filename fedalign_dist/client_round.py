"""One client's round on the rank that hosts it: the strategy's start state and model
preparation, local training with the strategy's loss terms, its statistics, the update
guard, personal state and the personalised evaluation."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from fedalign_dist import faults
from fedalign_dist.aggregation.guard import Verdict, screen_update, squared_norm
from fedalign_dist.clients.context import ClientContext
from fedalign_dist.clients.group_batch import GroupBatch
from fedalign_dist.clients.state import ShardView
from fedalign_dist.clients.trainer import LocalTrainer, client_batches
from fedalign_dist.models.router_tap import RouterTap
from fedalign_dist.strategies import ClientUpdate, Strategy


@dataclass
class ClientResult:
    """The update, the guard's verdict on it, the client's evaluation sums (empty when
    rejected) and the seconds spent in statistics and evaluation."""
    update: ClientUpdate
    verdict: Verdict
    sums: torch.Tensor
    seconds: dict
    within_clip: bool = True
    """Under privacy.enabled: whether the update's norm was within the clip bound C."""


class ClientRound:
    def __init__(self, cfg, device: torch.device, data, vocab_size: int, trainer: LocalTrainer,
                 strategy: Strategy, anatomy, store, privacy=None, shards=None):
        self.cfg, self.device, self.data, self.vocab_size = cfg, device, data, vocab_size
        self.privacy = privacy
        # client groups: the global state and the client's update are this rank's shard
        # (distributed/sharded_aggregation.py); None: whole
        self.shards = shards
        self.owner = shards.owner if shards is not None else None
        self.trainer, self.strategy, self.anatomy, self.store = trainer, strategy, anatomy, store
        self.aux_coef = float(getattr(trainer.module.config, "router_aux_loss_coef", 0.0))
        self.whole_batch = GroupBatch(trainer.group)  # batch-level loss terms over a client group's batch

    def run(self, round_idx: int, client_id: int, global_state: dict, evaluate: bool = True) -> ClientResult:
        cfg, data, module = self.cfg, self.data, self.trainer.module
        store = self.store if self.shards is None else ShardView(self.store, self.shards.owned)
        start = self.strategy.client_start_state(client_id, global_state, store)
        self.trainer.load_state(start, self.owner)
        self.strategy.prepare_client_model(module, client_id)
        self.trainer.reset_optimizer()  # no client inherits another's moments
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, round_idx, client_id]).generate_state(1)[0]))
        batches = lambda steps: client_batches(data, data.clients[client_id]["train"], steps,  # noqa: E731
                                               cfg.local.batch_size, cfg.seed, round_idx, client_id)
        loss = self.train(client_id, batches(cfg.local.steps_for(data.num_train(client_id))), start)
        trained = self.trainer.read_state(self.owner)
        delta = {n: trained[n] - global_state[n].float() for n in trained}
        if faults.client_fault("huge_delta_client", client_id):
            delta = {n: torch.full_like(t, 1e38) for n, t in delta.items()}

        t_stats = time.perf_counter()
        context = ClientContext(client_id, round_idx, data, self.device, self.vocab_size, cfg.local.batch_size,
                                batches)
        stats = self.strategy.client_statistics(module, context)
        t_stats_done = time.perf_counter()
        over_shards = self.shards.over_group if self.shards is not None else None
        verdict = screen_update(delta, stats, cfg.guard.max_update_norm, cfg.guard.on_large_update, over_shards)
        sums = data.task.empty_sums()
        if verdict.rejected is None:  # a rejected client keeps its previous personal state
            self.strategy.after_local_training(client_id, trained, self.store)
        t_eval = time.perf_counter()  # the guard and the state store count as local work
        if verdict.rejected is None and evaluate:
            test_idx = data.clients[client_id][cfg.eval.split]
            sums = data.task.evaluate_sums(module, data.examples_at(test_idx), cfg.eval.batch_size, self.device)
        uniform = cfg.fed.weighting == "uniform" or self.privacy is not None  # under DP the count is private
        update = ClientUpdate(client_id, 1 if uniform else data.num_train(client_id), verdict.delta, loss, stats)
        within = True
        if self.privacy is not None and verdict.rejected is not None and self.privacy.counts_every_client:
            # leaving a client out would change every other client's weight by its data: under DP a
            # non-finite update counts as a zero update (its statistics are bounded like any)
            print(f"WARNING: round {round_idx}: client {client_id}: {verdict.rejected}; under privacy.enabled it "
                  f"counts as a zero update", flush=True)
            update.delta, update.keeps_state = {n: torch.zeros_like(t) for n, t in delta.items()}, False
            verdict = Verdict(update.delta)
        if self.privacy is not None and verdict.rejected is None:  # before anything leaves the client
            update.own_delta = update.delta
            norm = None if over_shards is None else over_shards([squared_norm(update.delta)])[0] ** 0.5
            update.delta, update.stats, within = self.privacy.privatize_client(round_idx, client_id, update.delta,
                                                                               stats, norm)
        return ClientResult(
            update, verdict, sums, {"stats": t_stats_done - t_stats, "eval": time.perf_counter() - t_eval}, within
        )

    def train(self, client_id: int, batches, start: dict) -> float:
        """Local training; the mean task loss."""
        tap = RouterTap(self.trainer.module, self.anatomy.family) if self.strategy.wants_router_probs else None
        faults.maybe_raise("local_training")
        diverge = faults.client_fault("diverge_client", client_id)
        if diverge:
            self.trainer.set_lr(1e20)
        reference = self.trainer.regularizer_view(start)
        with tap or nullcontext():
            loss = self.trainer.train(batches, lambda model, batch: self.local_loss(model, batch, tap),
                                      lambda params: self.strategy.local_regularizer(params, reference),
                                      self.data.task.targets_in)
        if diverge:
            self.trainer.set_lr(self.cfg.local.lr)
        return loss

    def local_loss(self, model, batch, tap: RouterTap | None):
        """(objective, task loss): the task's loss plus the strategy's routing regulariser and
        any loss the model recorded (Strategy.model_loss)."""
        whole = self.whole_batch
        loss = self.data.task.loss(model, batch, self.aux_coef, whole.balance(model))
        extras = [whole.term(self.strategy.routing_regularizer(whole.router_probs(tap, batch["attention_mask"])))
                  if tap else None, self.strategy.model_loss(self.trainer.module, whole)]
        return loss + sum(e for e in extras if e is not None), loss
