"""The global state kept by shard under client groups (fed.ranks_per_client=G > 1).

The federated tensors are split into G shards of whole tensors (aggregation/shards.py); rank i
of every group holds shard i of the global state and of each client's update, and aggregates
it alone: the strategy runs unchanged on that shard, over the process group of "rank i of
every group", and sends 1/G of the state across groups. A client's start state reaches the
ZeRO-3 slices from the tensors' owners (clients/zero3_slices.py), so no rank holds the whole
model; checkpoints and the final export are written by shard (a LoRA adapter, adapter-sized, is
gathered whole on the run's first rank for PEFT's save). Per-client statistics cross between
groups once (ShardCommunicator)."""
from __future__ import annotations

import dataclasses
import json

import torch

from fedalign_dist.aggregation.shards import assign_shards, owned_entries, shard_of
from fedalign_dist.distributed import collectives
from fedalign_dist.distributed.agreement import state_digest
from fedalign_dist.distributed.communicator import Communicator


class ShardedAggregation:
    def __init__(self, shapes: dict[str, torch.Size], group, device: torch.device,
                 counter: collectives.ByteCounter):
        self.group, self.device, self.shapes = group, device, dict(shapes)
        self.owner = assign_shards({n: shape.numel() for n, shape in shapes.items()}, group.size)
        self.names = [shard_of(self.owner, part) for part in range(group.size)]
        self.mine = self.names[group.group_rank]
        self.client_group = group.get_data_parallel_group()
        self.within_group = collectives.ByteCounter()
        self.comm = ShardCommunicator(group, device, counter, self.within_group)

    def aggregate(self, strategy, shard: dict, updates: list) -> tuple[dict, dict]:
        """The strategy's aggregation of this rank's shard over the shard group. Every shard group
        must reach the same plan (the same statistics, gathered in the same order): checked,
        since differing plans would each be applied to some tensors only."""
        new_shard, diagnostics = strategy.aggregate(shard, [self._restricted(u) for u in updates], self.comm)
        self._check_same_plan(diagnostics)
        return new_shard, diagnostics

    def _restricted(self, update):
        keep = lambda d: None if d is None else {n: d[n] for n in self.mine}  # noqa: E731
        return dataclasses.replace(update, delta=keep(update.delta), own_delta=keep(update.own_delta))

    def over_group(self, values: list[float]) -> list[float]:
        """Element-wise sums over the group's ranks (float64): a whole update's norm from its shards."""
        return collectives.group_sum(values, self.client_group, self._wire())

    def owned(self, entries: dict) -> dict:
        """The entries of a client-state record that belong to this rank's shard."""
        return owned_entries(entries, self.owner, self.group.group_rank)

    def within_group_json(self, value) -> list:
        """A small JSON-able value from every rank of this rank's group, in group-rank order."""
        return collectives.all_gather_json(value, self.within_group, self._wire(), self.client_group)

    def whole_on_first(self, shard: dict) -> dict | None:
        """The whole state on the group's first rank (None elsewhere), gathered within the group:
        for a LoRA adapter's export (adapter-sized), which the run's first rank writes."""
        flat = collectives.flatten({n: shard[n].float() for n in self.mine})
        counts = self.within_group_json(flat.numel())
        first = self.group.get_data_parallel_group_ranks()[0]
        padded = torch.zeros(max(counts), dtype=torch.float32)
        padded[:flat.numel()] = flat
        padded = padded.to(self._wire()) if self._wire() is not None else padded
        bucket = [torch.empty_like(padded) for _ in counts] if self.group.group_rank == 0 else None
        collectives.gather_to(padded, bucket, first, self.client_group)
        if self.group.group_rank:
            self.within_group.sent += padded.numel() * 4
            return None
        out = {}
        for names, block in zip(self.names, bucket):
            offset = 0
            for name in names:
                size = self.shapes[name].numel()
                out[name] = block[offset:offset + size].cpu().view(self.shapes[name]).clone()
                offset += size
        return {n: out[n] for n in self.shapes}

    def check_same_start(self, shard: dict) -> None:
        """Rank i of every group must start from the same shard (see Runner.check_same_start)."""
        digests = collectives.all_gather_json(state_digest(shard), None, self._wire(), self.group.shard_group)
        if len(set(digests)) > 1:
            raise RuntimeError("ranks hold different starting global states: every rank must build the same model "
                               "(same model.path contents, seed and library versions); shard digests: "
                               + ", ".join(d[:12] for d in digests))

    def _check_same_plan(self, diagnostics: dict) -> None:
        plan = {k: v for k, v in diagnostics.items() if not k.endswith("_time_s")}  # a time measured on each rank
        text = json.dumps(plan, sort_keys=True, default=str)
        seen = self.within_group_json(text)
        if len(set(seen)) > 1:
            raise RuntimeError("the shards of one aggregation reached different plans (their diagnostics differ: "
                               + " | ".join(seen) + "); run with fed.ranks_per_client=1 and report this")

    def _wire(self):
        return self.device if self.device.type == "cuda" else None


class ShardCommunicator(Communicator):
    """What shard i's aggregation talks through: the process group of "rank i of every client
    group". Per-client statistics are the same on every rank of a group, so only the groups'
    first ranks gather them (over shard 0's group), and each passes them on within its group:
    they cross between groups once, not once per shard."""

    def __init__(self, group, device: torch.device, counter: collectives.ByteCounter,
                 within_group: collectives.ByteCounter):
        super().__init__(group.rank, len(group.shard_ranks), device, group=group.shard_group,
                         ranks=group.shard_ranks, counter=counter)
        self.client_group, self.within_group = group, within_group

    def sum_over_shards(self, values: list[float]) -> list[float]:
        return collectives.group_sum(values, self.client_group.get_data_parallel_group(), self._wire_device())

    def all_gather_client_items(self, items):
        first = self.client_group.group_rank == 0
        parts = self.all_gather_tensor_items(items) if first else None  # this rank's shard group is shard 0's
        blob = _item_bytes(parts) if first else b""
        raw = collectives.broadcast_bytes(blob, self.client_group.get_data_parallel_group_ranks()[0],
                                          self.client_group.get_data_parallel_group(), self._wire_device(),
                                          self.within_group)
        return parts if first else _items_from_bytes(raw)


def _item_bytes(parts: list[list[dict]]) -> bytes:
    """Gathered items as bytes: a JSON layout (each item's names), then their tensors (safetensors)."""
    from safetensors.torch import save
    tensors = {f"{p}/{i}/{k}": t.contiguous().clone() for p, part in enumerate(parts)
               for i, item in enumerate(part) for k, t in item.items()}
    head = json.dumps([[list(item) for item in part] for part in parts]).encode()
    return len(head).to_bytes(8, "little") + head + (save(tensors) if tensors else b"")


def _items_from_bytes(raw: bytes) -> list[list[dict]]:
    from safetensors.torch import load
    size = int.from_bytes(raw[:8], "little")
    layout = json.loads(raw[8:8 + size])
    tensors = load(raw[8 + size:]) if len(raw) > 8 + size else {}
    return [[{k: tensors[f"{p}/{i}/{k}"] for k in names} for i, names in enumerate(part)]
            for p, part in enumerate(layout)]
