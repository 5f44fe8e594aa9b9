"""The round loop: select, train, aggregate, evaluate, checkpoint, log."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedalign_dist import checkpoint, faults
from fedalign_dist.aggregation.guard import DivergedError, Verdict, nonfinite_names, screen_update
from fedalign_dist.clients.context import ClientContext
from fedalign_dist.clients.state import make_client_store
from fedalign_dist.clients.trainer import LocalTrainer, client_batches
from fedalign_dist.comm import Communicator
from fedalign_dist.config import Config
from fedalign_dist.data.task import answer_loss
from fedalign_dist.dist.agreement import all_ranks_agree, check_identical_on_all_ranks, on_coordinator
from fedalign_dist.dist.env import DistEnv
from fedalign_dist.dist.placement import clients_of_rank, round_clients_on_rank
from fedalign_dist.eval import empty_sums, evaluate_sums, summarise
from fedalign_dist.metrics import MetricsWriter, console_line, peak_gpu_mb, peak_rss_mb
from fedalign_dist.models.build import lora_base_model
from fedalign_dist.models.router_tap import RouterTap
from fedalign_dist.strategies import ClientUpdate, build_strategy, strategy_class



class Runner:
    def __init__(self, cfg: Config, env: DistEnv, data, tokenizer):
        self.cfg, self.env, self.data, self.tokenizer = cfg, env, data, tokenizer
        self.run_dir = cfg.run_dir
        engines_before = LocalTrainer.engines_built
        model, self.anatomy = strategy_class(cfg.strategy.name).build_model(cfg, tokenizer)
        self.trainer = LocalTrainer(model, cfg, env.device)
        self.engines_built = lambda: LocalTrainer.engines_built - engines_before  # noqa: E731
        self.global_state = self.trainer.read_state()
        self.store = make_client_store(cfg.fed.client_state, self.run_dir / "clients" / f"rank{env.rank}")
        self.strategy = build_strategy(cfg, self.anatomy, self.store)
        self.comm = Communicator(env.rank, env.world_size, env.device)  # aggregation traffic (counted)
        self.side = Communicator(env.rank, env.world_size, env.device)  # metrics bookkeeping
        self.aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0))
        self.trainable_bytes = sum(t.numel() * 4 for t in self.global_state.values())
        self.start_round, self.past_records = 0, []
        if cfg.run.resume is not False:
            # The coordinator picks the checkpoint (checksums verified once) for every rank.
            folder = on_coordinator("finding the checkpoint to resume", checkpoint.latest_checkpoint, self.run_dir)
            folder = self.side.all_gather_json(None if folder is None else str(folder))[0]
            if folder is not None:
                self.resume(Path(folder))
            elif cfg.run.resume is True:
                raise FileNotFoundError(f"run.resume=true but {self.run_dir} has no intact checkpoint")
        on_coordinator("describing the loaded model", checkpoint.write_json, self.run_dir / "model.json",
                       self.describe_model())
        # rank 0 does the I/O; on resume, TensorBoard is rebuilt from the kept metrics
        self.writer = on_coordinator("opening the metrics writer", MetricsWriter, self.run_dir,
                                     self.past_records if self.start_round else None)
        self.check_same_start()

    def describe_model(self) -> dict:
        """What was actually loaded and how it trains (the run folder's model.json)."""
        module, cfg = self.trainer.module, self.cfg
        config = getattr(module, "config", None)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        params = list(module.parameters())
        return {"source": cfg.model.path or f"preset {cfg.model.preset}", "family": cfg.model.family,
                "model_type": getattr(config, "model_type", None),
                "num_experts": self.anatomy.num_experts or None,
                "top_k": getattr(config, "num_experts_per_tok", None) if self.anatomy.num_experts else None,
                "checkpoint_dtype": str(stored).removeprefix("torch.") if stored is not None else None,
                "compute_dtype": "bfloat16" if cfg.deepspeed.bf16 else "float32",
                "federated_state_dtype": "float32", "parameters": sum(p.numel() for p in params),
                "trainable_parameters": sum(p.numel() for p in self.trainer.params.values()),
                "finetune": cfg.model.finetune}

    def check_same_start(self) -> None:
        """Every rank must start from the same finite global state: a model built differently
        on one rank would silently train another experiment there."""
        bad = nonfinite_names(self.global_state)
        if bad:
            raise DivergedError(f"the starting global state has non-finite values in {len(bad)} tensors "
                                f"(first: {bad[0]}); nothing to train from")
        check_identical_on_all_ranks(self.global_state, "starting global states: every rank must build the same "
                                     "model (same model.path contents, seed and library versions)")

    # -- one round ---------------------------------------------------------------------
    def run_round(self, round_idx: int) -> dict:
        cfg, t_start = self.cfg, time.perf_counter()
        my_clients = round_clients_on_rank(cfg.seed, round_idx, cfg.fed.num_clients, cfg.fed.clients_per_round,
                                           self.env.rank, self.env.world_size)
        with all_ranks_agree("local training"):  # a rank that fails here stops the others at once
            results = [self.train_client(round_idx, client_id) for client_id in my_clients]
            t_sync = time.perf_counter()
        accepted = [r.update for r in results if r.verdict.rejected is None]
        time_eval = sum(r.seconds["eval"] for r in results)
        time_stats = sum(r.seconds["stats"] for r in results)
        time_local = t_sync - t_start - time_eval - time_stats

        # Waiting for the slowest rank is not aggregation: time it apart. Every rank learns
        # which clients the guard rejected, so all leave out the same ones.
        screened = self.side.all_gather_json({"accepted": len(accepted), "rejected": [
            [r.update.client_id, r.verdict.rejected] for r in results if r.verdict.rejected is not None]})
        time_sync = time.perf_counter() - t_sync
        rejected = {cid: reason for part in screened for cid, reason in part["rejected"]}
        if self.env.is_coordinator:
            for cid, reason in sorted(rejected.items()):
                print(f"WARNING: round {round_idx}: client {cid} left out of aggregation: {reason}", flush=True)

        t_agg = time.perf_counter()
        if sum(part["accepted"] for part in screened):
            self.global_state, diagnostics = self.strategy.aggregate(self.global_state, accepted, self.comm)
        else:
            diagnostics = {"aggregation_skipped": "every sampled client was rejected"}
        with all_ranks_agree("checking the global state"):
            self.check_global_finite(round_idx)
        time_aggregate = time.perf_counter() - t_agg

        t_eval = time.perf_counter()
        evaluate_now = (round_idx + 1) % cfg.eval.every == 0 or round_idx + 1 == cfg.fed.rounds
        with all_ranks_agree("evaluating the global model"):
            global_sums = self.evaluate_global() if evaluate_now else empty_sums()
        time_eval += time.perf_counter() - t_eval

        local = dict(updates=[(u.num_examples, u.train_loss) for u in accepted],
                     personal=sum((r.sums for r in results), empty_sums()).tolist(),
                     clipped=sum(r.verdict.clipped for r in results),
                     global_=global_sums.tolist(), sent=self.comm.bytes.sent, received=self.comm.bytes.received,
                     time_comm=self.comm.bytes.seconds,
                     time_local=time_local, time_stats=time_stats, time_aggregate=time_aggregate,
                     time_sync=time_sync, time_eval=time_eval, time_round=time.perf_counter() - t_start,
                     rss=peak_rss_mb(), gpu=peak_gpu_mb(self.env.device))
        self.comm.bytes.reset()
        per_rank = self.side.all_gather_json(local)
        record = self.round_record(round_idx, per_rank, evaluate_now, rejected, diagnostics)
        # The round's metrics line before its checkpoint: a crash between the two re-runs the
        # round from the previous checkpoint, and resume cuts the metrics back to it.
        on_coordinator("writing the round's metrics", lambda: self.writer.write(record))
        if cfg.checkpoint.every and (round_idx + 1) % cfg.checkpoint.every == 0:
            self.save_checkpoint(round_idx)
        return record

    def check_global_finite(self, round_idx: int) -> None:
        bad = nonfinite_names(self.global_state)
        if bad:
            raise DivergedError(
                f"the global state became non-finite in round {round_idx} ({len(bad)} tensors, first: {bad[0]}); "
                f"the run stops without a final model or accuracy for it. Lower local.lr, or bound client updates "
                f"with guard.max_update_norm=<norm> (guard.on_large_update=clip|reject)")

    def train_client(self, round_idx: int, client_id: int) -> "ClientResult":
        cfg, data = self.cfg, self.data
        start = self.strategy.client_start_state(client_id, self.global_state, self.store)
        self.trainer.load_state(start)
        self.strategy.prepare_client_model(self.trainer.module, client_id)
        self.trainer.reset_optimizer()  # no client inherits another's moments (local.reset_optimizer)
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, round_idx, client_id]).generate_state(1)[0]))
        batches = lambda steps: client_batches(data.task, data.prompts, data.labels,  # noqa: E731
                                               data.clients[client_id]["train"], steps, cfg.local.batch_size,
                                               cfg.seed, round_idx, client_id)
        tap = RouterTap(self.trainer.module, self.anatomy.family) if self.strategy.wants_router_probs else None
        faults.maybe_raise("local_training")
        diverge = faults.client_fault("diverge_client", client_id)
        if diverge:
            self.trainer.set_lr(1e20)
        with tap or nullcontext():
            loss = self.trainer.train(batches(cfg.local.steps), lambda model, batch: self.local_loss(model, batch, tap),
                                      lambda params: self.strategy.local_regularizer(params, start))
        if diverge:
            self.trainer.set_lr(cfg.local.lr)
        trained = self.trainer.read_state()
        delta = {n: trained[n] - self.global_state[n].float() for n in trained}
        if faults.client_fault("huge_delta_client", client_id):
            delta = {n: torch.full_like(t, 1e38) for n, t in delta.items()}

        t_stats = time.perf_counter()
        context = ClientContext(client_id, round_idx, data, self.env.device, self.tokenizer.vocab_size,
                                cfg.local.batch_size, batches)
        stats = self.strategy.client_statistics(self.trainer.module, context)
        t_eval = time.perf_counter()
        verdict = screen_update(delta, stats, cfg.guard.max_update_norm, cfg.guard.on_large_update)
        sums = empty_sums()
        if verdict.rejected is None:  # a rejected client keeps its previous personal state
            self.strategy.after_local_training(client_id, trained, self.store)
            test_idx = data.clients[client_id][cfg.eval.split]
            sums = evaluate_sums(self.trainer.module, data.task, [data.prompts[i] for i in test_idx],
                                 [int(data.labels[i]) for i in test_idx], cfg.eval.batch_size, self.env.device)
        update = ClientUpdate(client_id, data.num_train(client_id), verdict.delta, loss, stats)
        return ClientResult(update, verdict, sums, {"stats": t_eval - t_stats, "eval": time.perf_counter() - t_eval})

    def local_loss(self, model, batch, tap: RouterTap | None):
        """(objective, task loss): the answer loss plus the strategy's routing regulariser and
        any loss the model recorded (Strategy.model_loss)."""
        loss = answer_loss(model, batch, self.data.task.window, self.aux_coef)
        extras = [self.strategy.routing_regularizer(tap.router_probs(batch["attention_mask"])) if tap else None,
                  self.strategy.model_loss(self.trainer.module)]
        objective = loss + sum(e for e in extras if e is not None)
        return objective, loss

    def evaluate_global(self) -> torch.Tensor:
        """The aggregated global model on the pooled test data, sharded over ranks."""
        self.trainer.load_state(self.global_state)
        self.strategy.prepare_global_model(self.trainer.module)
        pooled = self.data.pooled(self.cfg.eval.split)
        limit = self.cfg.eval.global_examples
        if limit is not None and limit < len(pooled):
            pooled = np.sort(np.random.default_rng([self.cfg.seed, 0xE7A1]).choice(pooled, limit, replace=False))
        pooled = pooled[self.env.rank::self.env.world_size]
        return evaluate_sums(self.trainer.module, self.data.task, [self.data.prompts[i] for i in pooled],
                             [int(self.data.labels[i]) for i in pooled], self.cfg.eval.batch_size, self.env.device)

    def round_record(self, round_idx, per_rank, evaluated, rejected, diagnostics) -> dict:
        pairs = [p for r in per_rank for p in r["updates"]]
        examples = sum(n for n, _ in pairs)
        personal = summarise(torch.tensor([r["personal"] for r in per_rank]).sum(0))
        glob = summarise(torch.tensor([r["global_"] for r in per_rank]).sum(0))
        return {
            "round": round_idx,
            "strategy": self.cfg.strategy.name,
            "num_clients_trained": len(pairs) + len(rejected),
            "num_rejected": len(rejected),
            "rejected_clients": sorted(rejected),
            "rejected_reasons": {str(cid): reason for cid, reason in sorted(rejected.items())},
            "num_clipped": sum(r["clipped"] for r in per_rank),
            "train_loss": sum(n * loss for n, loss in pairs) / examples if examples else None,
            "global_accuracy": glob["accuracy"] if evaluated else None,
            "global_perplexity": glob["perplexity"] if evaluated else None,
            "global_nonfinite_examples": glob["nonfinite_examples"],
            "personalized_accuracy": personal["accuracy"],
            "personalized_perplexity": personal["perplexity"],
            "personalized_nonfinite_examples": personal["nonfinite_examples"],
            "bytes_sent": max(r["sent"] for r in per_rank),
            "bytes_received": max(r["received"] for r in per_rank),
            "bytes_sent_per_rank": [r["sent"] for r in per_rank],
            "bytes_received_per_rank": [r["received"] for r in per_rank],
            "trainable_bytes": self.trainable_bytes,
            **{k: max(r[k.removesuffix("_s")] for r in per_rank)
               for k in ("time_local_s", "time_stats_s", "time_sync_s", "time_aggregate_s", "time_comm_s",
                         "time_eval_s", "time_round_s")},
            "peak_rss_mb": max(r["rss"] for r in per_rank),
            "peak_rss_mb_per_rank": [r["rss"] for r in per_rank],
            **({"peak_gpu_mb": max(r["gpu"] for r in per_rank), "peak_gpu_mb_per_rank": [r["gpu"] for r in per_rank]}
               if per_rank[0]["gpu"] is not None else {}),
            **diagnostics,
        }

    # -- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, round_idx: int) -> None:
        """Global and strategy state from the coordinator, client states from every rank; a
        failure in any step, on any rank, ends every rank."""
        on_coordinator("starting the checkpoint", checkpoint.begin_checkpoint, self.run_dir, round_idx)
        with all_ranks_agree("staging the client states"):
            self.store.export_to(checkpoint.staging_dir(self.run_dir, round_idx) / "clients")
        on_coordinator("committing the checkpoint", checkpoint.commit_checkpoint, self.run_dir, round_idx,
                       self.global_state, self.strategy.state_dict(), self.cfg.checkpoint.keep)

    def resume(self, folder: Path) -> None:
        with all_ranks_agree(f"restoring {folder}"):
            done, global_state, strategy_state = checkpoint.load_checkpoint(folder)
            self.global_state = {n: global_state[n] for n in self.global_state}
            self.strategy.load_state_dict(strategy_state)
            self.store.clear()
            hosted = set(clients_of_rank(self.env.rank, self.cfg.fed.num_clients, self.env.world_size))
            self.store.import_from(folder / "clients", hosted)
        self.start_round = done + 1
        self.past_records = on_coordinator("cutting the metrics back to the checkpoint",
                                           checkpoint.cut_metrics, self.run_dir, done) or []
        if self.env.is_coordinator:
            print(f"resumed from {folder.name}: continuing at round {self.start_round}", flush=True)

    # -- whole run ---------------------------------------------------------------------
    def run(self, progress: bool = True) -> list[dict]:
        from tqdm import tqdm
        t0, records = time.perf_counter(), list(self.past_records)
        bar = tqdm(range(self.start_round, self.cfg.fed.rounds), desc="rounds",
                   disable=not (progress and self.env.is_coordinator))
        for round_idx in bar:
            record = self.run_round(round_idx)
            records.append(record)
            if self.env.is_coordinator:
                bar.write(console_line(record))
        self.finish(records, time.perf_counter() - t0)
        return records

    def finish(self, records: list[dict], wall_s: float) -> None:
        inits = self.side.all_gather_json(self.engines_built())
        # every rank waits for the outputs before it tears down (where third-party crashes happen)
        on_coordinator("writing the final model and summary", self.write_final, records, wall_s, inits)

    def write_final(self, records: list[dict], wall_s: float, inits: list[int]) -> None:
        """Final model, then summary.json: the marker of a finished run, written last and atomically."""
        self.trainer.load_state(self.global_state)
        self.strategy.prepare_global_model(self.trainer.module)
        base = lora_base_model(self.cfg, self.tokenizer)
        export = lambda folder: self.strategy.export_final(folder, self.trainer.module, self.global_state)  # noqa: E731
        checkpoint.save_final(self.run_dir, self.global_state, self.trainer.module, self.cfg.model.finetune, base,
                              export)
        self.writer.close()
        last = records[-1]
        summary = {"rounds": len(records), "wall_s": wall_s, "engine_inits_per_rank": inits,
                   "world_size": self.env.world_size, "trainable_bytes": self.trainable_bytes,
                   "final_global_accuracy": last["global_accuracy"],
                   "final_personalized_accuracy": last["personalized_accuracy"]}
        checkpoint.write_json(self.run_dir / "summary.json", summary)


@dataclass
class ClientResult:
    """One client's round on its rank: the update, the guard's verdict on it, the client's
    evaluation sums (empty when rejected) and seconds spent in statistics and evaluation."""
    update: ClientUpdate
    verdict: Verdict
    sums: torch.Tensor
    seconds: dict
