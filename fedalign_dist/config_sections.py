"""The configuration's sections: every key with its type, default, documentation and the
checks that need nothing but the config itself.

This module imports nothing of the package, so that strategies, data sources and privacy
checks (the registries) can subclass ConfigSection and name Config without importing
config.py, which depends on them to validate their sections (config.py: loading, overrides,
and the checks that consult the registries).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator


class ConfigError(ValueError):
    """A user-facing configuration problem (bad key, bad value, impossible combination)."""


RESUME_FREE = {"resume_free": True}
"""Marks a field (Field(..., json_schema_extra=RESUME_FREE)) that a resumed run may change: how
the run is carried out, not what it computes (run_folder.check_resumable)."""


def resume_free_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The dotted paths (as tuples) of every field marked RESUME_FREE in `model` and its sections."""
    keys = set()
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("resume_free"):
            keys.add(prefix + (name,))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= resume_free_keys(field.annotation, prefix + (name,))
    return keys


class ConfigSection(BaseModel):
    """Base of every config section, a plugin's too: unknown keys are errors, assignments are
    validated. Each field's docstring is its documentation (`fedalign-dist config show`)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunConfig(ConfigSection):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)
    name: str = Field("run", json_schema_extra=RESUME_FREE)
    """Run folder name under output_dir."""
    output_dir: str = Field("runs", json_schema_extra=RESUME_FREE)
    overwrite: bool = Field(False, json_schema_extra=RESUME_FREE)
    """Replace an existing run folder instead of refusing to start."""
    resume: Union[bool, Literal["auto"]] = Field(False, json_schema_extra=RESUME_FREE)
    """Continue the run folder's latest intact checkpoint (global, strategy and client states):
    true = it must exist; auto = if there is one, else start (how a restarted job resumes)."""

    @model_validator(mode="after")
    def _check(self):
        if self.name in ("", ".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"run.name must be one plain folder name (no '/', '\\', '.' or '..'), got {self.name!r}: "
                             f"the run folder is run.output_dir/run.name; put any parent folders in run.output_dir")
        if self.resume is not False and self.overwrite:
            raise ValueError("run.resume=true continues the existing run folder; run.overwrite=true would delete "
                             "it: set only one of them")
        return self


class LoraConfigSection(ConfigSection):
    rank: int = Field(4, ge=1)
    alpha: float = Field(8.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    """Dense models (model.family=llama) only: the linear layers that get one LoRA each."""


class ModelConfig(ConfigSection):
    family: Literal["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama"] = "mixtral"
    """An MoE family, or `llama` (dense; for strategy fedamole, which adds its own LoRA experts)."""
    preset: Optional[Literal["tiny", "small", "medium"]] = "tiny"
    """Build a randomly initialised model of this size from a config (offline)."""
    path: Optional[str] = None
    """Local Hugging Face checkpoint directory (overrides preset)."""
    finetune: Literal["full", "lora"] = "full"
    freeze: list[str] = Field(default_factory=list)
    """Substrings of parameter names kept frozen in `full` mode (e.g. embed_tokens)."""
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    num_experts: int = Field(4, ge=2)
    top_k: int = Field(2, ge=1)
    router_aux_loss_coef: Optional[float] = Field(None, ge=0)
    """The router load-balancing loss's weight; unset: 0.01 for a preset, the checkpoint's own
    (its config.json) for model.path."""
    experts_implementation: Literal["grouped_mm", "batched_mm", "eager"] = "grouped_mm"

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"model.top_k ({self.top_k}) must be <= model.num_experts ({self.num_experts})")
        if self.path is None and self.preset is None:
            raise ValueError("set model.preset (tiny|small|medium) or model.path (a local checkpoint directory)")
        return self


class DataConfig(ConfigSection):
    """`name` (the data source) and `task`, plus one section per registered source or task
    type that declares knobs (keyed by its name): completed from the registries when a config
    is loaded (config_schema), after plugins were imported."""
    name: str = "bbc_news"
    """The data source: bbc_news, bbc_headlines, news_outlets, health_tweets, files (your own
    files: data.files.*), or one registered by a plugin."""
    task: str = "classification"
    """The task type: classification (text -> label word), instruction (prompt -> response:
    data.instruction.*), or one registered by a plugin."""
    partition: Literal["dirichlet", "label_shards", "iid", "natural", "sampled"] = "dirichlet"
    """How examples are dealt to clients. sampled: each client draws data.examples_per_client
    examples of its own Dirichlet label mix from the whole data set, so clients may share
    examples and there can be more clients than examples (systems measurements at scale)."""
    alpha: float = Field(0.5, gt=0)
    """Dirichlet concentration (smaller = more skewed label mixes)."""
    examples_per_client: Optional[int] = Field(None, ge=3)
    """Examples each client draws under data.partition=sampled (and only there)."""
    shards_per_client: int = Field(2, ge=1)
    tokenizer: Literal["byte", "gpt2", "model"] = "byte"
    """byte: 256 bytes + specials; gpt2: GPT-2 BPE shipped in a package; model: from model.path."""
    max_length: int = Field(128, ge=16)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    min_client_examples: int = Field(10, ge=3)
    max_examples: Optional[int] = Field(None, ge=10)
    """Use only this many examples of the data set (seeded subsample): for quick runs."""

    @model_validator(mode="after")
    def _check(self):
        if (self.partition == "sampled") != (self.examples_per_client is not None):
            raise ValueError("data.examples_per_client goes with data.partition=sampled, and only there: "
                             f"got partition={self.partition}, examples_per_client={self.examples_per_client}")
        if self.examples_per_client is not None and self.examples_per_client < self.min_client_examples:
            raise ValueError(f"data.examples_per_client={self.examples_per_client} is below "
                             f"data.min_client_examples={self.min_client_examples}")
        return self


class FedConfig(ConfigSection):
    num_clients: int = Field(8, ge=1)
    clients_per_round: int = Field(4, ge=1)
    rounds: int = Field(5, ge=1, json_schema_extra=RESUME_FREE)
    weighting: Literal["examples", "uniform"] = "examples"
    """What a client's update weighs in aggregation: its training examples (McMahan et al.), or
    1 for every client (always under privacy.enabled: example counts are private)."""
    client_state: Literal["memory", "disk"] = "memory"
    """Where per-client state (local-only weights) lives between rounds."""
    placement: Literal["balanced", "blocks"] = "balanced"
    """Which rank trains each of a round's clients. balanced: longest estimated work first onto
    the least-loaded rank (training and statistics examples; never evaluation, so the evaluation
    schedule changes no trained weight), a client's state moving with it; blocks: rank r always
    hosts the same contiguous block of clients. Results do not depend on it beyond float
    summation order."""
    ranks_per_client: int = Field(1, ge=1, json_schema_extra=RESUME_FREE)  # checkpoints hold whole tensors
    """Client groups: G consecutive ranks train one client at a time, its model, gradients and
    optimizer state sharded over them by ZeRO-3 (for models that do not fit one device); a
    round's clients are placed on groups as on ranks. Runs fedavg, fedprox, fedmoe, fedalign
    (both comm paths) and fedamole, with or without client-level DP; full fine-tuning or LoRA,
    fp32 or bf16."""
    groups_across_nodes: bool = False
    """Let a client group span nodes under NCCL (its ZeRO-3 collectives then cross the slower
    inter-node links every step). Off: a group that would span nodes is refused; start a
    multiple of fed.ranks_per_client processes per node."""

    @model_validator(mode="after")
    def _check(self):
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"fed.clients_per_round ({self.clients_per_round}) exceeds fed.num_clients "
                f"({self.num_clients}): lower clients_per_round or raise num_clients")
        return self


class LocalConfig(ConfigSection):
    steps: int = Field(10, ge=1)
    """Optimizer steps per client-round (the same for every client), unless `epochs` is set."""
    epochs: Optional[float] = Field(None, gt=0)
    """Passes over the client's own training examples per round instead of a fixed step count:
    ceil(epochs x examples / batch_size) steps, so a client with more data takes more steps
    (the classic FedAvg E). When set, `steps` is not used (a base config's steps need no
    removing)."""
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    reset_optimizer: bool = True
    """Fresh optimizer state for every client-round (the federated default). false is
    refused: one engine per rank serves all its clients, so moments would leak between them."""

    def steps_for(self, train_examples: int) -> int:
        """The local steps of a client holding this many training examples."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * train_examples / self.batch_size))

    @model_validator(mode="after")
    def _check(self):
        if not self.reset_optimizer:
            raise ValueError("local.reset_optimizer=false is not supported: each rank trains all its clients "
                             "through one optimizer, so Adam moments would carry from one client to the next "
                             "(results would depend on which rank hosts which client); remove the override")
        return self


class StrategyConfig(ConfigSection):
    """`name`, plus one section per registered strategy that declares knobs
    (`Strategy.config_section`, keyed by the strategy's name): the schema is completed from the
    registry when a config is loaded (config_schema), after plugins were imported."""
    name: str = "fedavg"


class DeepSpeedConfig(ConfigSection):
    zero_stage: int = Field(0, ge=0, le=3)
    bf16: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.zero_stage == 3:
            raise ValueError("deepspeed.zero_stage=3 is not supported: it partitions one client's weights "
                             "across ranks, but every rank here trains an independent client; use 0, 1 or 2, or "
                             "fed.ranks_per_client=G to shard each client over a group of G ranks (ZeRO-3)")
        return self


class CheckpointConfig(ConfigSection):
    every: int = Field(0, ge=0, json_schema_extra=RESUME_FREE)
    """Save a checkpoint every N rounds (0 = only the final state)."""
    keep: int = Field(2, ge=1, json_schema_extra=RESUME_FREE)


class EvalConfig(ConfigSection):
    every: int = Field(5, ge=1)
    """Evaluate the global model every N rounds (and in the last round); in other rounds the
    global_* metrics are None. 1 scores every round, at a cost: evaluating every round made the
    speed benchmark's rounds 1.4-1.6 times as long (bench/flower_side_by_side.py)."""
    personalized_every: int = Field(5, ge=1)
    """Score each trained client's personalised model every N rounds (and in the last round);
    in other rounds the personalized_* metrics are None. Benchmarks set one value for every
    method, so the methods stay comparable."""
    batch_size: int = Field(32, ge=1, json_schema_extra=RESUME_FREE)
    split: Literal["test", "val"] = "test"
    """Which split every evaluation uses: val for hyper-parameter selection, test to report."""
    global_examples: Optional[int] = Field(None, ge=1)
    """Evaluate the global model on this many pooled test examples (a seeded sample, the same
    every round); None = all of them."""


class GuardConfig(ConfigSection):
    """What a client's update must satisfy to enter aggregation. Non-finite updates and
    statistics are always rejected; a rejected client is left out of the round on every rank
    and logged (metrics: num_rejected, rejected_clients, rejected_reasons)."""
    max_update_norm: Optional[float] = Field(None, gt=0)
    """Bound on the L2 norm of a client's whole update (None: no bound)."""
    on_large_update: Literal["reject", "clip"] = "reject"
    """Above max_update_norm: leave the client out, or scale its update down to the bound."""


class PrivacyConfig(ConfigSection):
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) for every strategy,
    the routing statistics a strategy shares included (README "Privacy"). Off by default."""
    enabled: bool = False
    clip_norm: float = Field(0.1, gt=0)
    """C: every client's whole update is scaled down to at most this L2 norm (with
    adaptive_clip: the starting bound)."""
    noise_multiplier: float = Field(1.0, ge=0)
    """z: the aggregate gets Gaussian noise of std z * C * (the largest weight any client has in
    that parameter; 1/clients with the uniform weights DP uses), drawn once per round."""
    statistics_noise_multiplier: Optional[float] = Field(1.0, ge=0)
    """Gaussian noise, relative to their bound, on the statistics a client sends (routing
    usage, load, tokens, signatures; FedAMoLE's embeddings), each first normalised to a bound
    that holds whatever the data. None: sent in the clear (needs accept_clear_statistics)."""
    accept_clear_statistics: bool = False
    """Let a strategy share its statistics without noise; epsilon then covers the model updates
    only, and the summary says so."""
    adaptive_clip: bool = False
    """Adapt C each round towards the target_quantile of the clients' update norms (Andrew et
    al. 2021), from a noised count of the clients whose update was within C."""
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    """C <- C * exp(-clip_learning_rate * (noised fraction within C - target_quantile))."""
    count_noise_multiplier: Optional[float] = Field(None, gt=0)
    """Std of the Gaussian noise on the count of clients within C (its sensitivity is 1);
    None: max(fed.clients_per_round / 20, 2 * privacy.noise_multiplier), that is K/20 as
    Andrew et al. recommend, but at least twice the updates' noise, so that the count costs
    less privacy than the updates (its cost is counted)."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """The delta of the (epsilon, delta) statement; below 1 / fed.num_clients."""
    target_epsilon: Optional[float] = Field(None, gt=0)
    """Stop (with the final model and summary) before a round that would take epsilon above this."""
    noise_seed: Optional[int] = None
    """Seed of the noise and of the client sampling under DP. None: a secret drawn at the run's
    start and kept in its checkpoints (whoever knows it can remove the noise). Set it only for
    reproducible experiments."""


class DistConfig(ConfigSection):
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", json_schema_extra=RESUME_FREE)
    timeout_s: float = Field(1800.0, gt=0, json_schema_extra=RESUME_FREE)
    """How long a collective may wait for the other ranks before the job fails. Failures the
    project can see end every rank at once; this bounds the rest (a rank that hangs)."""


def group_split_error(world_size: int, group: int) -> str | None:
    if world_size % group == 0:
        return None
    return (f"world size {world_size} is not a multiple of fed.ranks_per_client={group} (its ranks do not split into "
            f"client groups of {group}): start a multiple of {group} processes, or set fed.ranks_per_client to a "
            f"divisor of {world_size}")


class Config(ConfigSection):
    imports: list[str] = Field(default_factory=list)
    """Python modules imported before the rest is validated, on every rank: they register
    strategies, data sources and task types (and their config sections) from outside the package
    (CLI: --import)."""
    run: RunConfig = Field(default_factory=RunConfig)
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    fed: FedConfig = Field(default_factory=FedConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        # checks that span sections; those that need the registries are config.py's
        world_size = (info.context or {}).get("world_size")
        if world_size is not None and group_split_error(world_size, self.fed.ranks_per_client):
            # before what else client groups refuse: with the right G those may not apply
            raise ValueError(group_split_error(world_size, self.fed.ranks_per_client))
        if self.eval.split == "val" and self.data.val_fraction == 0:
            raise ValueError("eval.split=val needs validation data: set data.val_fraction > 0")
        if self.data.tokenizer == "model" and self.model.path is None:
            raise ValueError("data.tokenizer=model needs model.path (a local checkpoint with a tokenizer)")
        if self.fed.ranks_per_client > 1:
            self._check_client_groups()
        return self

    def _check_client_groups(self):
        group = self.fed.ranks_per_client
        # what client groups cannot run, with why (one line before anything starts); whether the
        # strategy can is its own declaration (Strategy.runs_under_client_groups, checked with it)
        if self.local.batch_size % group:
            raise ValueError(f"local.batch_size={self.local.batch_size} does not split over client groups of {group} "
                             f"ranks: use a multiple of {group}")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name
