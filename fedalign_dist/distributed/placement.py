"""Which clients a round samples, and which rank hosts each client. Pure functions: every
rank computes the same answer from the same arguments, with no communication."""
from __future__ import annotations

import numpy as np


def rank_of_client(client_id: int, num_clients: int, world_size: int) -> int:
    """Contiguous blocks: rank r hosts clients [r*n/W, (r+1)*n/W). Any clients per rank.
    A client's home: where its state is restored on resume (fed.placement=blocks: always)."""
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


def block_placement(clients: list[int], num_clients: int, world_size: int) -> dict[int, int]:
    """{client: rank} by home blocks."""
    return {c: rank_of_client(c, num_clients, world_size) for c in clients}


def balanced_placement(clients: list[int], costs: list[float], world_size: int) -> dict[int, int]:
    """{client: rank} by longest processing time first: the costliest remaining client goes to
    the least-loaded rank (ties: lower client id first, then lower rank), which keeps the
    slowest rank within 4/3 of the best possible load. Depends on the arguments only, so a
    resumed run or another node places a round exactly as before."""
    if len(costs) != len(clients):
        raise ValueError(f"{len(clients)} clients but {len(costs)} costs")
    loads = [0.0] * world_size
    hosts = {}
    for cost, client in sorted(zip(costs, clients), key=lambda item: (-item[0], item[1])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        hosts[client] = rank
        loads[rank] += cost
    return dict(sorted(hosts.items()))


def client_cost(train_examples: int, stats_examples: int) -> float:
    """A client-round's work in example forward passes: a training example costs about three
    (forward, backward), a statistics example one. Evaluation is left out on purpose: where a
    client trains decides the order in which updates are summed, so a cost that counted the
    rounds that evaluate would let the evaluation schedule (or a run extended by resume, whose
    last round moves) change the trained weights."""
    return 3.0 * train_examples + stats_examples
