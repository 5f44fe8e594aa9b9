"""Which clients a round samples, and which rank hosts each client. Pure functions."""
from __future__ import annotations

import numpy as np


def rank_of_client(client_id: int, num_clients: int, world_size: int) -> int:
    """Contiguous blocks: rank r hosts clients [r*n/W, (r+1)*n/W). Any clients per rank."""
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id {client_id} outside [0, {num_clients})")
    return client_id * world_size // num_clients


def clients_of_rank(rank: int, num_clients: int, world_size: int) -> list[int]:
    return [c for c in range(num_clients) if rank_of_client(c, num_clients, world_size) == rank]


def sample_clients(seed: int, round_idx: int, num_clients: int, clients_per_round: int) -> list[int]:
    """The round's participants: a seeded draw that depends only on (seed, round), sorted."""
    rng = np.random.default_rng([seed, round_idx, 0x5A17])
    chosen = rng.choice(num_clients, size=clients_per_round, replace=False)
    return sorted(int(c) for c in chosen)


def round_clients_on_rank(seed: int, round_idx: int, num_clients: int, clients_per_round: int,
                          rank: int, world_size: int) -> list[int]:
    sampled = sample_clients(seed, round_idx, num_clients, clients_per_round)
    return [c for c in sampled if rank_of_client(c, num_clients, world_size) == rank]
