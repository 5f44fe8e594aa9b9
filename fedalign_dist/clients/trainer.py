"""Local training through ONE DeepSpeed engine per rank, reused for every client it hosts.

A client's starting weights are copied into the live engine in place (ZeRO-1/2 parameters
are views into flat buffers: rebinding `.data` would be lost), then the optimizer's fp32
master copies are refreshed and its state reset. A client group (GroupMPU of size G > 1)
shards one client's model over its G ranks by ZeRO-3: each rank holds a 1/G slice of every
parameter and of its optimizer state, and takes every G-th example of each batch."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fedalign_dist.aggregation.shards import assign_shards
from fedalign_dist.clients.group_mpu import GroupMPU
from fedalign_dist.clients.zero3_slices import gather_to_owners, scatter_from_owners, slice_of
from fedalign_dist.distributed.collectives import ByteCounter, group_mean
from fedalign_dist.safetensors_parts import DTYPE_NAMES, TensorSpec, spec_of

NamedTensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepPath:
    """Which parts of DeepSpeed's step a client's engine runs. Every engine is data-parallel
    size 1 (GroupMPU(1)), so DeepSpeed's gradient all-reduce is an identity that still flattens
    and copies every gradient, and zero-fills the gradient of every expert no token reached
    (AdamW then moves those experts by momentum and weight decay, as plain torch would not);
    its fp32 gradient clipping runs collectives over the size-1 group. Both are skipped for
    ZeRO-0 in fp32, where the engine's optimizer is the plain torch one; ZeRO-1/2 reduce and
    bf16 clips inside DeepSpeed's own optimizers, so those keep the full path."""
    backward_allreduce: bool
    deepspeed_clipping: bool

    @classmethod
    def lean(cls, cfg) -> "StepPath":
        full = cfg.deepspeed.zero_stage > 0 or cfg.deepspeed.bf16
        return cls(backward_allreduce=full, deepspeed_clipping=full)

    @classmethod
    def full(cls) -> "StepPath":
        return cls(backward_allreduce=True, deepspeed_clipping=True)


def zero3_sizes(hidden_size: int) -> dict:
    """ZeRO-3's buffer sizes scaled to the model, as Hugging Face's DeepSpeed integration sets
    them ("auto"): DeepSpeed's fixed defaults (a 5e8-element reduce bucket: 2 GB in fp32 on every
    rank) would outweigh the model slice a group exists to make small. No parameter is kept
    whole ("persistent"): a state loaded by writing each rank's slice would not reach it.
    DeepSpeed's default leaf modules (three transformers MoE blocks, gathered whole, their
    gradients reduced when the block's backward ends) are off: under a PEFT adapter that hook ran
    before the router's gradient was made and reduced an empty one ("0 != 256 Cannot reduce
    scatter gradients"). Leaves exist for experts called in a varying order; fused expert
    tensors are one module, called once."""
    return {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": hidden_size ** 2,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size ** 2), "leaf_module": {"classes": []}}


def deepspeed_config(cfg, hidden_size: int, path: StepPath | None = None, group_size: int = 1) -> dict:
    """One client's batch over its group: each of the G ranks takes batch / G examples and
    DeepSpeed averages their gradients; a group of G > 1 always shards by ZeRO-3."""
    path = path or StepPath.lean(cfg)
    if cfg.local.batch_size % group_size:
        raise ValueError(f"local.batch_size={cfg.local.batch_size} does not split over a client group of "
                         f"{group_size} ranks: use a multiple of {group_size}")
    return {
        "train_batch_size": cfg.local.batch_size,
        "train_micro_batch_size_per_gpu": cfg.local.batch_size // group_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.local.grad_clip if path.deepspeed_clipping else 0.0,
        "zero_optimization": zero3_sizes(hidden_size) if group_size > 1 else {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
    }


@contextmanager
def _launcher_variables():
    """DeepSpeed insists on a launcher's LOCAL_RANK; a plain process (the Python API) has
    none: set it for the engine's construction only, leaving os.environ as it was."""
    missing = "LOCAL_RANK" not in os.environ
    if missing:
        os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if missing:
            os.environ.pop("LOCAL_RANK", None)


def _skip_shared_memory_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op whenever it sets up
    communication: about a minute on a fresh machine, built under a lock file that a killed
    build leaves behind, after which every later engine waits on it forever. The op serves
    only inference all-reduce among ranks that set LOCAL_SIZE, which no client uses: marking
    it unavailable is DeepSpeed's own path for a machine that cannot build it."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def partition_over_group(model: torch.nn.Module, group: GroupMPU, config: dict, device: torch.device,
                         checkpoint: str | None = None) -> None:
    """Cut a model built on the host into ZeRO-3 slices over the client group, one parameter at a
    time: each goes to the device whole, takes the group's first rank's values and keeps only
    this rank's slice (deepspeed.zero.Init on a built module). The engine then leaves placement
    to ZeRO-3, where it would otherwise move the whole model to the device first, which is what
    a group exists to avoid. The values are those every ungrouped run builds from the same seed
    (building under zero.Init would draw them in another order). Buffers (rotary tables) are
    small and move whole, in fp32; DeepSpeed's replacement for torch's linear stays off
    (process-wide). Under deepspeed.bf16 the parameters are cast first: the fp32 masters are
    made from them, and load_state then writes the exact fp32 state into both. With `checkpoint`
    (a model.path every rank built as structure only: models/checkpoint_by_part.py), the group's
    first rank then reads it into the slices, one parameter at a time."""
    import deepspeed
    import torch.distributed as dist
    if config["bf16"]["enabled"]:  # ZeRO-3 takes a partitioned model's dtype as the compute dtype
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    # one module's own parameters at a time, children first: a rank that built only the structure
    # (models/build.py: structure_only) gives them storage just before ZeRO-3 fills it with the
    # group's first rank's values and keeps this rank's slice
    given = {}  # id(meta parameter) -> its replacement (a tied parameter is one object in two modules)
    for module in reversed(list(model.modules())):
        if not module._parameters:
            continue
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in given:
                    given[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                          requires_grad=param.requires_grad)
                module._parameters[name] = given[id(param)]
        deepspeed.zero.Init(module=module, mpu=group, data_parallel_group=group.get_data_parallel_group(),
                            config_dict_or_path=config, mem_efficient_linear=False)
    if checkpoint is not None:
        from fedalign_dist.models.checkpoint_by_part import read_into_slices
        read_into_slices(model, checkpoint, first=group.group_rank == 0)
    first = group.get_data_parallel_group_ranks()[0]
    for buffer in model.buffers():  # the first rank's (loaded with the weights), on every rank
        buffer.data = buffer.data.to(device)
        dist.broadcast(buffer.data, first, group=group.get_data_parallel_group())


def share_fp32_masters(optimizer) -> None:
    """ZeRO-3 in fp32: make the optimizer's fp32 master slices the parameters' own slices.
    ZeRO-3 means to share them when the dtypes agree, but compares a torch.device with the
    device's name (a str), which never holds, so it keeps a second fp32 copy: 1.25x the
    parameters, gradients and moments a rank needs. Shared, its step's copy from masters to
    parameters copies a slice onto itself."""
    for low, master in zip(getattr(optimizer, "fp16_partitioned_groups_flat", []),
                           getattr(optimizer, "fp32_partitioned_groups_flat", [])):
        if (low is not None and low.dtype == master.dtype and low.device == master.device
                and low.shape == master.shape and low.data_ptr() != master.data_ptr()):
            master.data = low.data


class LocalTrainer:
    engines_built = 0
    """DeepSpeed engines built in this process (a run reports how many it built: one per rank)."""

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device, path: StepPath | None = None,
                 group: GroupMPU | None = None, checkpoint: str | None = None):
        """`checkpoint`: a client group whose ranks all built `model` as structure only reads this
        model.path into its slices (partition_over_group)."""
        import deepspeed
        self.cfg, self.device = cfg, device
        self.read_into_slices = checkpoint is not None
        self.group = group or GroupMPU(1)
        self.sharded = self.group.size > 1
        self.state_bytes = ByteCounter()  # client groups: bytes sent moving a state kept by shard in and out
        self.path = StepPath.full() if self.sharded else path or StepPath.lean(cfg)
        config = deepspeed_config(cfg, model.config.hidden_size, self.path, self.group.size)
        _skip_shared_memory_comm_op()
        with _launcher_variables():
            if self.sharded:
                partition_over_group(model, self.group, config, device, checkpoint)
            else:
                model.to(device)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=cfg.local.lr, weight_decay=cfg.local.weight_decay)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                     mpu=self.group, config=config)
        self.engine.enable_backward_allreduce = self.path.backward_allreduce
        if self.sharded:
            share_fp32_masters(self.engine.optimizer)
        LocalTrainer.engines_built += 1
        self.params = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
        # ZeRO-0 + bf16 keeps its fp32 masters in lists parallel to the bf16 parameters
        # (ZeRO-1/2 expose theirs through deepspeed.utils.safe_get/set_full_fp32_param)
        opt = self.engine.optimizer
        self._stage0_masters = {id(p): m for low, high in zip(getattr(opt, "fp16_groups", []),
                                                              getattr(opt, "fp32_groups", []))
                                for p, m in zip(low, high)}

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def load_state(self, state: NamedTensors, owner: dict[str, int] | None = None) -> None:
        """The module's parameters get `state` (rounded to bf16 under deepspeed.bf16); the
        optimizer's fp32 master weights get it exactly, so no update is lost to rounding.
        In a client group, `owner` (tensor name -> group rank) says that `state` is kept by
        shard: this rank holds its own tensors only, and the owners scatter the slices."""
        from deepspeed.utils import safe_set_full_fp32_param
        if self.sharded:
            self._load_slices(state, owner)
            return
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state[name])
        if self.cfg.deepspeed.bf16:
            with torch.no_grad():
                for name, param in self.params.items():
                    value = state[name].to(param.device, torch.float32)
                    master = self._stage0_masters.get(id(param))
                    if master is not None:
                        master.copy_(value)
                    else:
                        safe_set_full_fp32_param(param, value)
            return
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def _load_slices(self, state: NamedTensors, owner: dict[str, int] | None) -> None:
        """Each rank writes only its own slice: no rank gathers the full model to load it. A
        parameter left gathered (whole) by an evaluation that called submodules directly would
        keep computing with its old value: it is released first."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import safe_set_local_fp32_param
        whole = [p for p in self.module.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE]
        if whole:
            whole[0].partition(param_list=whole, has_been_updated=False)
        rank = self.group.group_rank
        slices = (((n, p, slice_of(state[n], p, rank)) for n, p in self.params.items()) if owner is None
                  else scatter_from_owners(self.params, state, owner, self.group, self.device, self.state_bytes))
        with torch.no_grad():
            for name, param, shard in slices:
                shard = shard.to(param.ds_tensor.device, torch.float32)
                param.ds_tensor.copy_(shard)
                if self.cfg.deepspeed.bf16:
                    safe_set_local_fp32_param(param, shard)
        if not self.cfg.deepspeed.bf16:
            self.engine.optimizer.refresh_fp32_params()

    def module_state(self, state: NamedTensors) -> NamedTensors | None:
        """What a LoRA adapter's save_pretrained should write: `state` (whole) under client groups,
        whose module holds slices; None when the module is whole (it writes its own). A full
        model under client groups is written by part (see untrained_part)."""
        return dict(state) if self.sharded else None

    def export_plan(self, owner: dict[str, int]) -> list[dict[str, TensorSpec]]:
        """Client groups: what each group rank writes in the final export by part (see
        untrained_part), as specs: its shard of the fp32 global state (`owner`), the frozen
        parameters it is given, and on the first rank the persistent buffers."""
        plan = [{} for _ in range(self.group.size)]
        for name, shape in self.shapes().items():
            plan[owner[name]][name] = ("F32", list(shape))
        frozen = self._frozen()
        for name, rank in self._frozen_owner(frozen).items():
            plan[rank][name] = (DTYPE_NAMES[frozen[name].dtype], list(frozen[name].ds_shape))
        plan[0].update({n: spec_of(b) for n, b in self._persistent_buffers().items()})
        return plan

    def untrained_part(self) -> NamedTensors:
        """Client groups, for the final export by part: the frozen parameters (outside the
        federated state) that this rank writes, balanced over the group by size, each
        all-gathered one at a time (a collective over the group: every rank of it calls, in the
        same order) and kept, on the host, by this rank only; and on the group's first rank the
        persistent buffers (whole on every rank): with the global state's shards, all that a
        whole module's save writes."""
        import deepspeed
        frozen = self._frozen()
        owner, mine = self._frozen_owner(frozen), {}
        for name, param in frozen.items():
            with deepspeed.zero.GatheredParameters([param]):
                if owner[name] == self.group.group_rank:
                    mine[name] = param.detach().to("cpu", copy=True)
        if self.group.group_rank == 0:
            mine.update(self._persistent_buffers())
        return mine

    def _frozen(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if n not in self.params}

    def _frozen_owner(self, frozen: dict[str, torch.nn.Parameter]) -> dict[str, int]:
        return assign_shards({n: p.ds_numel for n, p in frozen.items()}, self.group.size)

    def _persistent_buffers(self) -> NamedTensors:
        """What a whole module's save writes of its buffers (a rotary table is not persistent)."""
        return {f"{prefix}.{name}".lstrip("."): buffer for prefix, sub in self.module.named_modules()
                for name, buffer in sub.named_buffers(recurse=False) if name not in sub._non_persistent_buffers_set}

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

    def shapes(self) -> dict[str, torch.Size]:
        """The trainable parameters' whole shapes (a ZeRO-3 parameter holds a slice)."""
        return {n: p.ds_shape if self.sharded else p.shape for n, p in self.params.items()}

    def read_state(self, owner: dict[str, int] | None = None) -> NamedTensors:
        """fp32 trainable weights: under deepspeed.bf16 the optimizer's fp32 masters (the bf16
        module parameters would quantise every update smaller than one bf16 step away). In a
        client group a collective over the group; with `owner` (tensor name -> group rank) each
        rank gets the tensors it owns only."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
        if self.sharded and owner is not None:
            return gather_to_owners(self.params, safe_get_local_fp32_param, owner, self.group, self.device,
                                    self.state_bytes)
        if self.sharded:  # every rank of the group calls, in the same order
            return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in self.params.items()}
        if not self.cfg.deepspeed.bf16:
            return {n: p.detach().float().cpu().clone() for n, p in self.params.items()}
        out = {}
        for name, param in self.params.items():
            master = self._stage0_masters.get(id(param))
            master = master if master is not None else safe_get_full_fp32_param(param)
            if master is None:
                raise RuntimeError(f"deepspeed.bf16: no fp32 master weight for {name}")
            out[name] = master.detach().float().cpu().clone()
        return out

    def regularizer_view(self, state: NamedTensors) -> NamedTensors:
        """A reference state (a proximal term's anchor) as `train`'s regulariser meets the parameters: whole
        on one rank; in a client group this rank's flat fp32 slices."""
        if not self.sharded:
            return state
        if not all(n in state for n in self.params):  # kept by shard: the slices load_state just wrote
            from deepspeed.utils import safe_get_local_fp32_param
            return {n: safe_get_local_fp32_param(p).detach().float().clone() for n, p in self.params.items()}
        rank = self.group.group_rank
        return {n: slice_of(state[n], p, rank).to(p.ds_tensor.device, torch.float32) for n, p in self.params.items()}

    def _add_slice_regularizer_gradient(self, regularizer: Callable[[dict], torch.Tensor | None]) -> None:
        """Client groups: a parameter-space term must be a sum over elements (a proximal term is); each
        rank differentiates it on its own fp32 slices and adds that to its slice of the group's
        averaged gradient before the step (and its clipping), so no rank needs whole parameters."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad
        slices = {n: safe_get_local_fp32_param(p).detach().requires_grad_() for n, p in self.params.items()}
        extra = regularizer(slices)
        if extra is None:
            return
        grads = torch.autograd.grad(extra, list(slices.values()), allow_unused=True)
        for param, grad in zip(self.params.values(), grads):
            if grad is not None:
                safe_set_local_grad(param, safe_get_local_grad(param) + grad.reshape(-1))

    def train(self, batches, loss_fn: Callable, regularizer: Callable[[dict], torch.Tensor | None],
              count_targets: Callable[[dict], int] | None = None) -> float:
        """Run one client's local steps; returns the mean task loss (aux loss included).
        `loss_fn(model, batch)` returns (objective to minimise, task loss to report), both
        computed through the engine; `regularizer(params)` may add a parameter-space term
        (in a client group: on this rank's slices, against `regularizer_view`'s reference).
        In a client group each rank takes every G-th row; `count_targets(batch)` (the task's
        loss denominator) lets each rank divide by 1/G of the whole batch's count, so the
        group's averaged gradient is the whole batch's."""
        self.engine.train()
        losses = []
        size, rank = self.group.size, self.group.group_rank
        for batch in batches:
            if size > 1:
                whole = count_targets(batch) if count_targets else None
                batch = {k: v[rank::size] for k, v in batch.items()}
                if whole is not None:
                    batch["loss_denominator"] = torch.tensor(max(whole, 1) / size)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            objective, task_loss = loss_fn(self.engine, batch)
            extra = None if self.sharded else regularizer(self.params)
            self.engine.backward(objective if extra is None else objective + extra)
            if self.sharded:
                self._add_slice_regularizer_gradient(regularizer)
            if not self.path.deepspeed_clipping and self.cfg.local.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.local.grad_clip)
            self.engine.step()
            losses.append(float(task_loss.detach()))
        if size > 1 and losses:  # each rank's loss is over its rows only: the group's mean is the batch's
            losses = group_mean(losses, self.group.get_data_parallel_group(), self.device)
        return float(np.mean(losses)) if losses else float("nan")


def client_batches(data, train_idx: np.ndarray, steps: int, batch_size: int, seed: int, round_idx: int,
                   client_id: int):
    """The client's batches for one round: seeded by (seed, round, client) only, so results
    do not depend on which rank hosts the client."""
    rng = np.random.default_rng([seed, round_idx, client_id, 0xBA7C])
    need = steps * batch_size
    order = np.concatenate([rng.permutation(train_idx) for _ in range(-(-need // len(train_idx)))])[:need]
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        yield data.task.train_batch(data.examples_at(idx))
