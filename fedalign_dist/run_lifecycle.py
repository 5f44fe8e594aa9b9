"""The run folder over a run's life, for the round loop: prepare it, resume from its latest
intact checkpoint, describe the loaded model, checkpoint a round, write the final model and
summary. Rank 0 does the I/O (checkpoint.py, run_folder.py); each step is one that every
rank fails together (distributed/agreement.py)."""
from __future__ import annotations

from pathlib import Path

from fedalign_dist import checkpoint, faults
from fedalign_dist.distributed.agreement import all_ranks_agree, on_coordinator
from fedalign_dist.distributed.placement import clients_of_rank
from fedalign_dist.metrics import MetricsWriter
from fedalign_dist.models.build import lora_base_model
from fedalign_dist.models.hf_parts import write_model_index, write_model_part
from fedalign_dist.run_manifest import record_written
from fedalign_dist.safetensors_parts import check_complete, layout_of, spec_of, write_part


def prepare(cfg) -> None:
    """Rank 0 prepares the folder (refusing to clobber anything); every rank hears if it
    failed, and checks that it sees the same folder (a shared file system)."""
    from fedalign_dist.run_folder import check_shared_run_folder, prepare_run_dir, write_share_token
    token = on_coordinator("preparing the run folder", lambda: write_share_token(prepare_run_dir(cfg)))
    check_shared_run_folder(cfg.run_dir, token)


def whole_module(cfg, tokenizer, strategy, global_state: dict):
    """The run's model built whole again, as every ungrouped rank built it (the same seed: the
    same frozen weights), with the global state loaded: for a strategy that exports a format
    of its own under client groups, where the trained module holds ZeRO-3 slices."""
    module, _ = type(strategy).build_model(cfg, tokenizer)
    missing = set(global_state) - {n for n, _ in module.named_parameters()}
    if missing:
        raise RuntimeError(f"the rebuilt model lacks {sorted(missing)[:3]} of the global state")
    module.load_state_dict(global_state, strict=False)
    return module


class RunLifecycle:
    def __init__(self, cfg, env, side, strategy, store, privacy=None):
        self.cfg, self.env, self.side, self.strategy, self.store = cfg, env, side, strategy, store
        self.privacy = privacy
        self.run_dir = cfg.run_dir
        self.writer = None

    def resume(self, global_state: dict) -> tuple[int, dict, list[dict]]:
        """(first round to run, global state, kept metrics records): from the latest intact
        checkpoint if run.resume asks for one, else (0, global_state, [])."""
        if self.cfg.run.resume is False:
            return 0, global_state, []
        # The coordinator picks the checkpoint (checksums verified once) for every rank.
        folder = on_coordinator("finding the checkpoint to resume", checkpoint.latest_checkpoint, self.run_dir)
        folder = self.side.all_gather_json(None if folder is None else str(folder))[0]
        if folder is None:
            if self.cfg.run.resume is True:
                raise FileNotFoundError(f"run.resume=true but {self.run_dir} has no intact checkpoint")
            return 0, global_state, []
        folder = Path(folder)
        with all_ranks_agree(f"restoring {folder}"):
            done, global_state, strategy_state = checkpoint.load_checkpoint(folder, list(global_state))
            privacy_state = {k: strategy_state.pop(k) for k in list(strategy_state) if k.startswith("privacy.")}
            if self.privacy is not None:
                if not privacy_state:
                    raise ValueError(f"{folder} was written without privacy.enabled: it cannot be resumed with it")
                self.privacy.load_state_dict(privacy_state)
            elif privacy_state:
                raise ValueError(f"{folder} was written with privacy.enabled: resuming without it would add "
                                 f"un-noised rounds to a run whose earlier rounds claimed DP; set privacy.enabled=true "
                                 f"with the settings it had, or start a new run")
            self.strategy.load_state_dict(strategy_state)
            self.store.clear()
            group = self.cfg.fed.ranks_per_client  # every rank of a client group holds its clients' states
            hosts = self.env.world_size // group
            hosted = set(clients_of_rank(self.env.rank // group, self.cfg.fed.num_clients, hosts))
            self.store.import_from(folder, hosted)
        on_coordinator("removing client states no checkpoint names", checkpoint.sweep_blobs, self.run_dir)
        records = on_coordinator("cutting the metrics back to the checkpoint",
                                 checkpoint.cut_metrics, self.run_dir, done) or []
        if self.env.is_coordinator:
            print(f"resumed from {folder.name}: continuing at round {done + 1}", flush=True)
        return done + 1, global_state, records

    def open(self, model_description: dict, data_description: dict, replay: list[dict] | None) -> None:
        """model.json, data.json and the metrics writer (on resume, TensorBoard rebuilt from `replay`)."""
        on_coordinator("describing the loaded model", checkpoint.write_json, self.run_dir / "model.json",
                       model_description)
        on_coordinator("describing the data", checkpoint.write_json, self.run_dir / "data.json", data_description)
        self.writer = on_coordinator("opening the metrics writer", MetricsWriter, self.run_dir, replay)

    def log(self, record: dict) -> None:
        on_coordinator("writing the round's metrics", lambda: self.writer.write(record))

    def checkpoint_due(self, round_idx: int) -> bool:
        return bool(self.cfg.checkpoint.every and (round_idx + 1) % self.cfg.checkpoint.every == 0)

    def checkpoint(self, round_idx: int, global_state: dict | None, part: tuple[int, int] | None = None) -> None:
        """Global and strategy state from the coordinator, client states from every rank. Under
        client groups `global_state` is this rank's shard `part` = (index, parts), which it writes
        itself (the first group's ranks; None elsewhere)."""
        if not self.checkpoint_due(round_idx):
            return
        on_coordinator("starting the checkpoint", checkpoint.begin_checkpoint, self.run_dir, round_idx)
        with all_ranks_agree("staging the client states"):
            entries = self.store.export_to(checkpoint.blob_dir(self.run_dir))
            checkpoint.stage_client_part(self.run_dir, round_idx, self.env.rank, entries)
            if part is not None:
                checkpoint.stage_global_part(self.run_dir, round_idx, *part, global_state)
        on_coordinator("committing the checkpoint", checkpoint.commit_checkpoint, self.run_dir, round_idx,
                       None if part is not None else global_state, {**self.strategy.state_dict(),
                       **(self.privacy.state_dict() if self.privacy is not None else {})}, self.cfg.checkpoint.keep)

    def finish(self, trainer, tokenizer, global_state: dict, summary: dict, shards=None) -> None:
        """The final model, then summary.json (a finished run's marker, written last and
        atomically); every rank waits for them before it tears down. Under client groups
        (`shards`, the ShardedAggregation) a full model is written by part, from `global_state`
        as this rank's shard, and no rank gathers the whole model."""
        own_format = self.strategy.exports_own_format
        if shards is not None and self.cfg.model.finetune != "lora" and not own_format:
            self._export_by_part(trainer, global_state, shards)
            on_coordinator("writing the summary", self._write_summary, summary)
            return
        module_state = trainer.module_state(global_state)

        def write():
            module = trainer.module
            if shards is not None and own_format:  # the strategy's export reads a whole module
                module = whole_module(self.cfg, tokenizer, self.strategy, global_state)
            else:
                trainer.load_state(global_state)
            self.strategy.prepare_global_model(module)
            export = lambda folder: self.strategy.export_final(folder, module, global_state)  # noqa: E731
            checkpoint.save_final(self.run_dir, global_state, module, self.cfg.model.finetune,
                                  lora_base_model(self.cfg, tokenizer), export, module_state)
            self._write_summary(summary)
        on_coordinator("writing the final model and summary", write)

    def _export_by_part(self, trainer, shard: dict, shards) -> None:
        """final/ as a whole run writes it (global.safetensors, model/ that from_pretrained loads),
        written by the first client group: its rank i writes shard i of the global state at its
        offsets in global.safetensors and the model's file i (shard i with the frozen parameters
        it was given, see LocalTrainer.untrained_part); the coordinator (its rank 0) adds the
        header, the index and config.json, then publishes the folder. A strategy that exports a
        format of its own is given a whole module instead (whole_module, in finish)."""
        folder = checkpoint.final_staging(self.run_dir)
        on_coordinator("preparing the final folder", checkpoint.begin_final, self.run_dir)
        writer = shards.group.index == 0
        extra = trainer.untrained_part() if writer else None  # a collective within the first group
        mine = None
        with all_ranks_agree("describing the final model's parts"):
            if writer:
                mine = [{n: spec_of(t) for n, t in part.items()} for part in (shard, extra)]
        if writer:
            specs = shards.within_group_json(mine)
            global_specs = {n: s for rank_specs in specs for n, s in rank_specs[0].items()}
            model_specs = {n: s for rank_specs in specs for part in rank_specs for n, s in part.items()}
        info = None
        with all_ranks_agree("writing the final model by part"):
            if writer:
                index, parts = shards.group.group_rank, shards.group.size
                write_part(folder / "global.safetensors", layout_of(global_specs), shard, header=index == 0)
                faults.maybe_raise("final_export_part")
                (folder / "model").mkdir(exist_ok=True)
                info = write_model_part(folder / "model", trainer.module, {**extra, **shard}, index, parts)
        if writer:
            infos = shards.within_group_json(info)

        def index_and_publish():
            check_complete(folder / "global.safetensors", layout_of(global_specs))
            write_model_index(folder / "model", trainer.module, infos, model_specs)
            checkpoint.publish_final(self.run_dir)
        on_coordinator("indexing the final model", index_and_publish)

    def _write_summary(self, summary: dict) -> None:
        self.writer.close()
        record_written(self.run_dir, self.run_dir / "final")  # published whole just before
        checkpoint.write_json(self.run_dir / "summary.json", summary)
        print(f"results in {self.run_dir}: metrics.jsonl, summary.json, final/ (tensorboard --logdir "
              f"{self.run_dir / 'tb'}); `fedalign-dist report {self.run_dir}` writes summary.md and plots",
              flush=True)
