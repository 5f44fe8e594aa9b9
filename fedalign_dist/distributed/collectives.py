"""Collectives over named tensors, with byte accounting. One process: pass-through.

Seconds are wall time spent inside the collectives (communication, as the time split reports it).
Bytes are payload bytes per rank under the ring algorithms: all_reduce sends and receives
2(W-1)/W of the buffer; all_gather sends (W-1) chunks of its own size and receives the W-1
others; broadcast: the root sends one copy per peer, each peer receives one.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ByteCounter:
    sent: int = 0
    received: int = 0
    seconds: float = 0.0

    def reset(self) -> tuple[int, int]:
        out = (self.sent, self.received)
        self.sent = self.received = 0
        self.seconds = 0.0
        return out

    @contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


def world_size(group=None) -> int:
    """Ranks in `group` (None: the world)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()]) if tensors else torch.zeros(0)


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, ref in like.items():
        out[name] = flat[offset:offset + ref.numel()].view_as(ref)
        offset += ref.numel()
    return out


def all_reduce_sum(tensors: dict[str, torch.Tensor], counter: ByteCounter,
                   device: torch.device | None = None, group=None) -> dict[str, torch.Tensor]:
    """Sum named tensors over the ranks of `group` (None: the world) with ONE collective on a
    flat buffer."""
    flat = flatten(tensors)
    world = world_size(group)
    if world > 1:
        with counter.timed():
            flat = flat.to(device) if device is not None else flat
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat = flat.cpu()
        nbytes = flat.numel() * flat.element_size()
        counter.sent += 2 * (world - 1) * nbytes // world
        counter.received += 2 * (world - 1) * nbytes // world
    return unflatten(flat, tensors)


def broadcast_(tensors: dict[str, torch.Tensor], counter: ByteCounter, src: int = 0,
               device: torch.device | None = None, group=None) -> None:
    """Overwrite every rank's tensors with rank `src`'s (a world rank, in `group`), in place."""
    world = world_size(group)
    if world == 1:
        return
    flat = flatten(tensors)
    with counter.timed():
        flat = flat.to(device) if device is not None else flat
        dist.broadcast(flat, src=src, group=group)
        flat = flat.cpu()
    nbytes = flat.numel() * flat.element_size()
    if dist.get_rank() == src:
        counter.sent += (world - 1) * nbytes
    else:
        counter.received += nbytes
    for name, part in unflatten(flat, tensors).items():
        tensors[name].copy_(part)


def _gather_counts(count: int, counter: ByteCounter, device: torch.device | None, group=None) -> list[int]:
    """Every rank's integer (e.g. its number of rows), in rank order, as one tiny tensor all_gather."""
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size(group))]
    with counter.timed():
        dist.all_gather(out, mine, group=group)
    counter.sent += (world_size(group) - 1) * 8
    counter.received += (world_size(group) - 1) * 8
    return [int(c.item()) for c in out]


def all_gather_json(obj, counter: ByteCounter | None = None, device: torch.device | None = None,
                    group=None) -> list:
    """Small JSON-able values (counts, metrics, ids) from every rank of `group`, in rank order.
    Sent as UTF-8 bytes in a tensor: no pickle crosses ranks, so a peer can send data, never code."""
    world = world_size(group)
    if world == 1:
        return [json.loads(json.dumps(obj))]  # the same types as with several ranks (tuples become lists)
    counter = counter if counter is not None else ByteCounter()
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    blocks = all_gather_rows(data[:, None], counter, device, group)
    return [json.loads(block.flatten().numpy().tobytes().decode()) for block in blocks]


def all_gather_rows(rows: torch.Tensor, counter: ByteCounter,
                    device: torch.device | None = None, group=None) -> list[torch.Tensor]:
    """Every rank's (k_r, D) block of rows, in rank order; k_r may differ between ranks
    (blocks are padded to the largest for one all_gather; the padding is counted)."""
    world = world_size(group)
    if world == 1:
        return [rows]
    counts = _gather_counts(int(rows.shape[0]), counter, device, group)
    width = rows.shape[1]
    padded = torch.zeros(max(counts), width, dtype=rows.dtype)
    padded[:rows.shape[0]] = rows
    with counter.timed():
        padded = padded.to(device) if device is not None else padded
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded, group=group)
        out = [block.cpu() for block in out]
    nbytes = padded.numel() * padded.element_size()
    counter.sent += (world - 1) * nbytes
    counter.received += (world - 1) * nbytes
    return [block[:k] for block, k in zip(out, counts)]


def all_gather_tensor_items(items: list[dict[str, torch.Tensor]], counter: ByteCounter,
                            device: torch.device | None = None, group=None) -> list[list[dict[str, torch.Tensor]]]:
    """Every rank's list of named-tensor items (e.g. one client's statistics each; every item
    has the same names and shapes), per rank in rank order. The layout travels as JSON, the
    values as one float64 tensor (exact for float32, integer counts and booleans)."""
    layout = [[k, list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in items[0].items()] if items else None
    layouts = all_gather_json(layout, counter, device, group)
    layout = next((lay for lay in layouts if lay is not None), None)
    if layout is None:
        return [[] for _ in layouts]
    rows = (torch.stack([torch.cat([item[k].double().reshape(-1) for k, _, _ in layout]) for item in items])
            if items else torch.zeros(0, sum(math.prod(shape) for _, shape, _ in layout), dtype=torch.float64))
    out = []
    for block in all_gather_rows(rows, counter, device, group):
        part = []
        for row in block:
            item, offset = {}, 0
            for key, shape, dtype in layout:
                size = math.prod(shape)
                item[key] = row[offset:offset + size].reshape(shape).to(getattr(torch, dtype))
                offset += size
            part.append(item)
        out.append(part)
    return out


def broadcast_bytes(blob: bytes, src: int, group, device: torch.device | None = None,
                    counter: ByteCounter | None = None) -> bytes:
    """`src`'s bytes on every rank of `group` (others pass b""): its length, then its bytes."""
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    dist.broadcast(size, src, group=group)
    data = (torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device) if blob
            else torch.empty(int(size), dtype=torch.uint8, device=device))
    if int(size):
        dist.broadcast(data, src, group=group)
    if counter is not None and dist.get_rank() == src:
        counter.sent += (dist.get_world_size(group) - 1) * (int(size) + 8)
    return blob if dist.get_rank() == src else data.cpu().numpy().tobytes()


def scatter_to(out: torch.Tensor, pieces: list[torch.Tensor] | None, src: int, group) -> None:
    """`src`'s pieces[r] into `out` on rank r of `group` (others pass pieces=None)."""
    dist.scatter(out, pieces, src=src, group=group)


def gather_to(tensor: torch.Tensor, bucket: list[torch.Tensor] | None, dst: int, group) -> None:
    """Every rank's `tensor` into `dst`'s bucket, in the group's rank order (others pass None)."""
    dist.gather(tensor, bucket, dst=dst, group=group)


def group_sum(values: list[float], group, device: torch.device | None = None) -> list[float]:
    """Element-wise sum of `values` over the ranks of `group` (float64)."""
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed, group=group)
    return summed.cpu().tolist()


def group_mean(values: list[float], group, device: torch.device | None = None) -> list[float]:
    """Element-wise mean of `values` over the ranks of `group` (float64)."""
    size = dist.get_world_size(group)
    return [v / size for v in group_sum(values, group, device)]
