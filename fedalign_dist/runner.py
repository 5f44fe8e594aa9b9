"""The round loop: select, train each client, aggregate, evaluate, log, checkpoint. Client
training lives in client_round.py, the run folder's life in run_lifecycle.py, every
method-specific step in the strategy: this file names no strategy and no model family."""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from fedalign_dist.aggregation.guard import DivergedError, nonfinite_names
from fedalign_dist.client_round import ClientResult, ClientRound
from fedalign_dist.clients.group_mpu import GroupMPU
from fedalign_dist.clients.state import make_client_store
from fedalign_dist.clients.state_moves import StateHolders, share_within_group
from fedalign_dist.clients.trainer import LocalTrainer
from fedalign_dist.config import Config
from fedalign_dist.distributed.agreement import all_ranks_agree, check_identical_on_all_ranks
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.distributed.env import DistEnv
from fedalign_dist.distributed.placement import balanced_placement, block_placement, client_cost, sample_clients
from fedalign_dist.distributed.sharded_aggregation import ShardedAggregation
from fedalign_dist.metrics import console_line, peak_gpu_mb, peak_rss_mb, round_record
from fedalign_dist.models.build import describe_model, structure_only
from fedalign_dist.models.checkpoint_by_part import loads_by_part
from fedalign_dist.models.hf_parts import check_plan
from fedalign_dist.privacy.mechanism import ClientLevelDP
from fedalign_dist.run_lifecycle import RunLifecycle
from fedalign_dist.strategies import build_strategy, strategy_class


class Runner:
    def __init__(self, cfg: Config, env: DistEnv, data, tokenizer):
        self.cfg, self.env, self.data, self.tokenizer = cfg, env, data, tokenizer
        self.engines_before = LocalTrainer.engines_built  # engines built by this run = the difference
        # a client group's other ranks build the structure only: ZeRO-3 fills their slices from its
        # first rank, which builds the whole model, unless it reads a checkpoint into the slices
        by_part = loads_by_part(cfg)
        partner = cfg.fed.ranks_per_client > 1 and env.rank % cfg.fed.ranks_per_client != 0
        with structure_only(cfg) if partner or by_part else nullcontext():
            model, self.anatomy = strategy_class(cfg.strategy.name).build_model(cfg, tokenizer)
        # client groups (fed.ranks_per_client): a group's ranks train the same clients in
        # lockstep, each holding a ZeRO-3 shard; only the group's first rank reports them
        self.group = GroupMPU(cfg.fed.ranks_per_client)
        self.hosts_count = env.world_size // self.group.size
        self.reports = self.group.group_rank == 0
        self.trainer = LocalTrainer(model, cfg, env.device, group=self.group,
                                    checkpoint=cfg.model.path if by_part else None)
        self.comm = Communicator(env.rank, env.world_size, env.device)  # aggregation traffic (counted)
        self.side = Communicator(env.rank, env.world_size, env.device)  # metrics bookkeeping
        # client groups: rank i of every group holds and aggregates shard i of the global state
        self.sharded = (ShardedAggregation(self.trainer.shapes(), self.group, env.device, self.comm.bytes)
                        if self.group.size > 1 else None)
        self.owner = self.sharded.owner if self.sharded is not None else None
        self.own_export_format = strategy_class(cfg.strategy.name).exports_own_format
        if self.sharded is not None and cfg.model.finetune != "lora" and not self.own_export_format:
            check_plan(self.trainer.module, self.trainer.export_plan(self.owner))  # the export by part will work
        self.global_state = self.trainer.read_state(self.owner)
        self.store = make_client_store(cfg.fed.client_state, cfg.run_dir / "clients" / f"rank{env.rank}")
        self.holders = StateHolders(cfg.fed.num_clients, env.world_size, self.group.size)
        self.strategy = build_strategy(cfg, self.anatomy, self.store)
        self.privacy = ClientLevelDP.start(cfg, self.strategy, self.side)  # None unless privacy.enabled
        self.clients = ClientRound(cfg, env.device, data, tokenizer.vocab_size, self.trainer, self.strategy,
                                   self.anatomy, self.store, self.privacy, self.sharded)
        self.trainable_bytes = sum(shape.numel() * 4 for shape in self.trainer.shapes().values())
        self.lifecycle = RunLifecycle(cfg, env, self.side, self.strategy, self.store, self.privacy)
        self.start_round, self.global_state, self.past_records = self.lifecycle.resume(self.global_state)
        self.lifecycle.open(describe_model(cfg, self.trainer, self.anatomy), data.describe(cfg.data.name),
                            self.past_records if self.start_round else None)
        self.check_same_start()

    def run(self, progress: bool = True) -> list[dict]:
        from tqdm import tqdm
        t0, records = time.perf_counter(), list(self.past_records)
        # a progress bar only on a terminal: in a log file (SLURM, CI) it is carriage-return
        # noise, and the one line per round below says the same
        bar = tqdm(range(self.start_round, self.cfg.fed.rounds), desc="rounds",
                   disable=not (progress and self.env.is_coordinator and sys.stderr.isatty()))
        stopped_at_target = False
        for round_idx in bar:
            if self.privacy is not None and self.privacy.would_exceed_target(round_idx):
                stopped_at_target = True
                if self.env.is_coordinator:
                    bar.write(f"privacy.target_epsilon={self.cfg.privacy.target_epsilon:g} reached: round {round_idx} "
                              f"would take epsilon to {self.privacy.epsilon(round_idx + 1):.3g}; stopping with "
                              f"{round_idx} rounds")
                break
            records.append(self.run_round(round_idx))
            if self.env.is_coordinator:
                bar.write(console_line(records[-1], self.data.task.metrics[0]))
        inits = self.side.all_gather_json(LocalTrainer.engines_built - self.engines_before)
        # resumed with no round left to run (the export failed), only the coordinator, which writes
        # the summary, holds the past records
        last = records[-1] if records else {}
        self.lifecycle.finish(self.trainer, self.tokenizer, self.state_for_writing(), shards=self.sharded, summary={
            "rounds": len(records), "wall_s": time.perf_counter() - t0, "engine_inits_per_rank": inits,
            "world_size": self.env.world_size, "trainable_bytes": self.trainable_bytes,
            **{f"final_{scope}_{metric}": last.get(f"{scope}_{metric}")
               for scope in ("global", "personalized") for metric in self.data.task.metrics},
            **(self.privacy.summary(len(records), stopped_at_target) if self.privacy is not None else {})})
        return records

    # -- one round ---------------------------------------------------------------------
    def run_round(self, round_idx: int) -> dict:
        cfg, clock = self.cfg, {"start": time.perf_counter()}
        last = round_idx + 1 == cfg.fed.rounds
        score_personal = (round_idx + 1) % cfg.eval.personalized_every == 0 or last
        hosts = self.place_round(round_idx)
        moved_bytes = self.holders.follow(hosts, self.store, self.side)  # states go where their clients train
        my_clients = [c for c, rank in hosts.items() if rank // self.group.size == self.group.index]
        # a rank that fails here stops the others at once; a client group's ranks meet in ZeRO-3's
        # collectives inside training, where a partner would wait for the failed rank until
        # dist.timeout_s: that rank leaves at once instead, and the partner's collective fails
        with all_ranks_agree("local training") if self.group.size == 1 else nullcontext():
            results = [self.clients.run(round_idx, client_id, self.global_state, score_personal)
                       for client_id in my_clients]
        # a group's ranks hold the same results: each aggregates its shard of them, the first reports them
        accepted_here = [r.update for r in results if r.verdict.rejected is None]
        results = results if self.reports else []
        clock["trained"] = time.perf_counter()
        accepted, rejected, anyone_accepted = self.exchange_verdicts(round_idx, results)
        clock["synced"] = time.perf_counter()
        diagnostics = self.aggregate(round_idx, accepted_here, anyone_accepted)
        if self.sharded is not None:  # personal experts: each shard's entries from the rank that aggregated it
            self.sharded.within_group.sent += share_within_group(my_clients, self.store, self.group, self.owner,
                                                                 self.env.device)
        if self.privacy is not None:
            clip_used = self.privacy.clip_norm
            diagnostics.update(self.privacy.adapt_clip(round_idx, sum(r.within_clip for r in results if
                                                                      r.verdict.rejected is None),
                                                       self.cfg.fed.clients_per_round, self.comm))
            diagnostics.update(self.privacy.record(round_idx + 1, clip_used))
        clock["aggregated"] = time.perf_counter()
        evaluate_now = (round_idx + 1) % cfg.eval.every == 0 or last
        with all_ranks_agree("evaluating the global model"):
            global_sums = self.evaluate_global() if evaluate_now else self.data.task.empty_sums()
        clock["evaluated"] = time.perf_counter()
        record = self.gather_record(round_idx, results, accepted, rejected, global_sums,
                                    (evaluate_now, score_personal), diagnostics, clock, moved_bytes)
        # The round's metrics line before its checkpoint: a crash between the two re-runs the
        # round from the previous checkpoint, and resume cuts the metrics back to it.
        self.lifecycle.log(record)
        if self.sharded is None:
            self.lifecycle.checkpoint(round_idx, self.global_state)
        elif self.group.index == 0:  # the first group's ranks write one shard each
            self.lifecycle.checkpoint(round_idx, self.global_state, (self.group.group_rank, self.group.size))
        else:
            self.lifecycle.checkpoint(round_idx, None)
        return record

    def place_round(self, round_idx: int) -> dict[int, int]:
        """{client: rank} for the round's sampled clients (fed.placement); under client groups
        the first rank of the client's group. A function of the federation (clients, sizes,
        round, seed) only, never of the evaluation schedule (placement.client_cost)."""
        hosts = self.place_on_hosts(round_idx)
        return {c: host * self.group.size for c, host in hosts.items()}

    def place_on_hosts(self, round_idx: int) -> dict[int, int]:
        cfg = self.cfg
        # under DP from the secret: the accountant's amplification assumes nobody knows the sample
        seed = self.privacy.secret if self.privacy is not None else cfg.seed
        sampled = sample_clients(seed, round_idx, cfg.fed.num_clients, cfg.fed.clients_per_round)
        if cfg.fed.placement == "blocks" or self.hosts_count == 1:
            return block_placement(sampled, cfg.fed.num_clients, self.hosts_count)
        request = self.strategy.stats_request
        stats = request.batches * cfg.local.batch_size if request is not None else 0
        costs = [client_cost(cfg.local.steps_for(self.data.num_train(c)) * cfg.local.batch_size, stats)
                 for c in sampled]
        return balanced_placement(sampled, costs, self.hosts_count)

    def exchange_verdicts(self, round_idx: int, results: list[ClientResult]):
        """Every rank learns which clients the guard rejected, so all leave out the same ones
        (this exchange is also where ranks wait for the slowest)."""
        accepted = [r.update for r in results if r.verdict.rejected is None]
        screened = self.side.all_gather_json({"accepted": len(accepted), "rejected": [
            [r.update.client_id, r.verdict.rejected] for r in results if r.verdict.rejected is not None]})
        rejected = {cid: reason for part in screened for cid, reason in part["rejected"]}
        if self.env.is_coordinator:
            for cid, reason in sorted(rejected.items()):
                print(f"WARNING: round {round_idx}: client {cid} left out of aggregation: {reason}", flush=True)
        return accepted, rejected, any(part["accepted"] for part in screened)

    def aggregate(self, round_idx: int, accepted, anyone_accepted: bool) -> dict:
        """The strategy's aggregation of this host's accepted updates (by shard under client
        groups), then the check that the new global state is finite, on every rank. A round whose
        every sampled client the guard rejected stops the run (the same verdict on every rank):
        going on would train nothing and report the untouched model as the result."""
        if anyone_accepted:
            if self.sharded is not None:
                self.global_state, diagnostics = self.sharded.aggregate(self.strategy, self.global_state, accepted)
            else:
                self.global_state, diagnostics = self.strategy.aggregate(self.global_state, accepted, self.comm)
            if self.privacy is not None:
                self.global_state, noise_info = self.privacy.noise_aggregate(round_idx, self.global_state, self.comm)
                diagnostics = {**diagnostics, **noise_info}
        else:
            raise DivergedError(
                f"the update guard rejected every sampled client in round {round_idx} (reasons in the WARNING "
                f"lines), so nothing was trained; the run stops without a final model or metrics for it. "
                f"Lower local.lr")
        with all_ranks_agree("checking the global state"):
            bad = nonfinite_names(self.global_state)
            if bad:
                raise DivergedError(
                    f"the global state became non-finite in round {round_idx} ({len(bad)} tensors, first: {bad[0]}); "
                    f"the run stops without a final model or metrics for it. Lower local.lr, or bound client "
                    f"updates with guard.max_update_norm=<norm> (guard.on_large_update=clip|reject)")
        return diagnostics

    def evaluate_global(self) -> torch.Tensor:
        """The aggregated global model on the pooled test data, split over ranks (over client
        groups: a group's ranks run the same examples together, its first rank reports)."""
        self.trainer.load_state(self.global_state, self.owner)
        self.strategy.prepare_global_model(self.trainer.module)
        pooled = self.data.pooled(self.cfg.eval.split)
        limit = self.cfg.eval.global_examples
        if limit is not None and limit < len(pooled):
            pooled = np.sort(np.random.default_rng([self.cfg.seed, 0xE7A1]).choice(pooled, limit, replace=False))
        pooled = pooled[self.group.index::self.hosts_count]
        sums = self.data.task.evaluate_sums(self.trainer.module, self.data.examples_at(pooled),
                                            self.cfg.eval.batch_size, self.env.device)
        return sums if self.reports else self.data.task.empty_sums()

    def gather_record(self, round_idx, results, accepted, rejected, global_sums, evaluated, diagnostics,
                      clock, moved_bytes: int) -> dict:
        """This rank's numbers, gathered from every rank into the round's metrics record."""
        personal_eval = sum(r.seconds["eval"] for r in results)
        time_stats = sum(r.seconds["stats"] for r in results)
        local = dict(updates=[(u.num_examples, u.train_loss) for u in accepted],
                     clients=[r.update.client_id for r in results], moved=moved_bytes,
                     personal=sum((r.sums for r in results), self.data.task.empty_sums()).tolist(),
                     clipped=sum(r.verdict.clipped for r in results),
                     global_=global_sums.tolist(), sent=self.comm.bytes.sent, received=self.comm.bytes.received,
                     within_group=(self.sharded.within_group.reset()[0] + self.trainer.state_bytes.reset()[0]
                                   if self.sharded is not None else 0),
                     time_comm=self.comm.bytes.seconds, time_stats=time_stats,
                     time_eval=personal_eval + clock["evaluated"] - clock["aggregated"],
                     time_local=clock["trained"] - clock["start"] - personal_eval - time_stats,
                     time_sync=clock["synced"] - clock["trained"],
                     time_aggregate=clock["aggregated"] - clock["synced"],
                     time_round=time.perf_counter() - clock["start"],
                     rss=peak_rss_mb(), gpu=peak_gpu_mb(self.env.device))
        self.comm.bytes.reset()
        per_rank = self.side.all_gather_json(local)
        return round_record(round_idx, self.cfg.strategy.name, per_rank, evaluated, rejected, diagnostics,
                            self.trainable_bytes, self.data.task)

    def check_same_start(self) -> None:
        """Every rank must start from the same finite global state: a model built differently
        on one rank would silently train another experiment there."""
        with all_ranks_agree("checking the starting global state"):  # under client groups each rank checks its shard
            bad = nonfinite_names(self.global_state)
            if bad:
                raise DivergedError(f"the starting global state has non-finite values in {len(bad)} tensors "
                                    f"(first: {bad[0]}); nothing to train from")
        if self.sharded is not None:
            self.sharded.check_same_start(self.global_state)
            return
        check_identical_on_all_ranks(self.global_state, "starting global states: every rank must build the same "
                                     "model (same model.path contents, seed and library versions)")

    def state_for_writing(self) -> dict:
        """The global state as the export takes it: whole; under client groups this rank's shard
        (the first group's ranks each write theirs), but a LoRA adapter (adapter-sized, saved by
        PEFT) or a state that a strategy exports in a format of its own gathered whole on the
        run's first rank."""
        gathered = self.cfg.model.finetune == "lora" or self.own_export_format
        if self.sharded is None or not gathered or self.group.index != 0:
            return self.global_state
        whole = self.sharded.whole_on_first(self.global_state)
        return whole if whole is not None else self.global_state
