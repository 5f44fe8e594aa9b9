"""Per-client state follows its client: when a round places a client on another rank than the
one holding its state (fed.placement=balanced), the holder sends the client's entries to the
round's host as safetensors bytes (exact, and no pickle crosses ranks). Every rank keeps the
same map of holders, changed only by the placements every rank computes alike, so no rank has
to ask where a client's state is."""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedalign_dist.clients.state import ClientStore
from fedalign_dist.dist.placement import rank_of_client


class StateHolders:
    def __init__(self, num_clients: int, world_size: int):
        # home blocks: where a resumed run restores each client's state
        self.holder = np.array([rank_of_client(c, num_clients, world_size) for c in range(num_clients)])

    def follow(self, hosts: dict[int, int], store: ClientStore, comm) -> int:
        """Move to each client's host its entries held elsewhere; the bytes this rank sent."""
        moves = [(c, int(self.holder[c]), r) for c, r in hosts.items() if self.holder[c] != r]
        if not moves:  # every rank computes the same moves, so every rank skips the collectives
            return 0
        header, blobs = [], []
        for client, source, _ in moves:
            if source != comm.rank:
                continue
            for key in store.keys_of(client):
                blob = save_bytes({n: t.contiguous() for n, t in store.get(client, key).items()})
                header.append([client, key, len(blob)])
                blobs.append(blob)
                store.drop(client, key)
        headers = comm.all_gather_json(header)
        if any(headers):
            rows = (torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)[:, None] if blobs
                    else torch.zeros(0, 1, dtype=torch.uint8))
            parts = comm.all_gather_rows(rows)
            for part_header, part in zip(headers, parts):
                raw, offset = part.flatten().numpy().tobytes(), 0
                for client, key, size in part_header:
                    if hosts[client] == comm.rank:
                        store.put(client, key, load_bytes(raw[offset:offset + size]))
                    offset += size
        for client, _, target in moves:
            self.holder[client] = target
        return sum(len(b) for b in blobs)
