"""Per-client state follows its client: when a round places a client on another rank than the
one holding its state (fed.placement=balanced), the holder sends the client's entries to the
round's host as safetensors bytes (exact, and no pickle crosses ranks). Every rank keeps the
same map of holders, changed only by the placements every rank computes alike, so no rank has
to ask where a client's state is."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedalign_dist.aggregation.shards import owned_entries
from fedalign_dist.clients.state import ClientStore
from fedalign_dist.distributed.collectives import ByteCounter, all_gather_json, all_gather_rows
from fedalign_dist.distributed.placement import rank_of_client


class StateHolders:
    """Holders are hosts: ranks, or client groups (fed.ranks_per_client=G, where every rank of
    a group keeps the same copy of its clients' states, since all of them load each client)."""

    def __init__(self, num_clients: int, world_size: int, group_size: int = 1):
        self.group_size = group_size
        # home blocks: where a resumed run restores each client's state
        hosts = world_size // group_size
        self.holder = np.array([rank_of_client(c, num_clients, hosts) for c in range(num_clients)])

    def follow(self, hosts: dict[int, int], store: ClientStore, comm) -> int:
        """Move to each client's host (hosts: client -> its rank, a group's first rank) its
        entries held elsewhere; the bytes this rank sent."""
        size, mine = self.group_size, comm.rank // self.group_size
        target = {c: r // size for c, r in hosts.items()}
        moves = [(c, int(self.holder[c])) for c, t in target.items() if self.holder[c] != t]
        if not moves:  # every rank computes the same moves, so every rank skips the collectives
            return 0
        header, blobs = [], []
        for client, source in moves:
            if source != mine:
                continue
            for key in store.keys_of(client):
                if comm.rank % size == 0:  # the holding host's first rank sends; all of its ranks let go
                    pack(header, blobs, client, key, store.get(client, key))  # one entry in memory at a time
                store.drop(client, key)
        for part in all_gather_entries(header, blobs, comm.all_gather_json, comm.all_gather_rows):
            for client, key, entries in part:
                if target[client] == mine:
                    store.put(client, key, entries())
        for client, _ in moves:
            self.holder[client] = target[client]
        return sum(map(len, blobs))


def share_within_group(clients: list[int], store: ClientStore, group, owner: dict[str, int],
                       device: torch.device) -> int:
    """Client groups: the strategy updates a client's state (FedAlign-MoE's personal experts) in
    `aggregate`, where rank i of a group aggregates shard i (`owner`: tensor name -> group rank)
    and so keeps only that shard's entries up to date. Each rank sends the entries it owns; every
    rank of the group then holds the same merged state for each of `clients` (an entry its owner
    dropped is gone), so all of them load the same start state next time. The bytes this rank sent."""
    if group.size == 1 or not clients:
        return 0
    header, blobs = [], []
    for client in clients:
        for key in store.keys_of(client):
            pack(header, blobs, client, key, owned_entries(store.get(client, key), owner, group.group_rank))
    over_group = dict(counter=ByteCounter(), device=device if device.type == "cuda" else None,
                      group=group.get_data_parallel_group())
    merged: dict[tuple[int, str], dict] = {}
    for part in all_gather_entries(header, blobs, partial(all_gather_json, **over_group),
                                   partial(all_gather_rows, **over_group)):
        for client, key, entries in part:
            merged.setdefault((client, key), {}).update(entries())
    for client in clients:
        for key in store.keys_of(client):
            store.drop(client, key)
    for (client, key), entries in merged.items():
        if entries:
            store.put(client, key, entries)
    return over_group["counter"].sent


def pack(header: list, blobs: list[bytes], client: int, key: str, tensors: dict) -> None:
    """Append a client-state entry to a header of [client, key, bytes] rows and its safetensors
    blob (exact, and no pickle crosses ranks; no tensors: no bytes)."""
    blob = save_bytes({n: t.contiguous() for n, t in tensors.items()}) if tensors else b""
    header.append([client, key, len(blob)])
    blobs.append(blob)


def all_gather_entries(header: list, blobs: list[bytes], gather_json, gather_rows) -> list[list[tuple]]:
    """Every rank's entries (`pack`), in rank order, as (client, key, load) where load() reads the
    tensors: a receiver reads only those it keeps. Two collectives (`gather_json`, then
    `gather_rows` of the bytes as one uint8 column), the second skipped on every rank alike
    when no rank has entries."""
    headers = gather_json(header)
    if not any(headers):
        return [[] for _ in headers]
    blob = b"".join(blobs)
    rows = (torch.frombuffer(bytearray(blob), dtype=torch.uint8)[:, None] if blob
            else torch.zeros(0, 1, dtype=torch.uint8))
    out = []
    for part_header, block in zip(headers, gather_rows(rows)):
        raw, offset, part = memoryview(block.flatten().numpy()), 0, []
        for client, key, size in part_header:
            piece = raw[offset:offset + size]
            part.append((client, key, lambda piece=piece: load_bytes(bytes(piece)) if len(piece) else {}))
            offset += size
        out.append(part)
    return out
