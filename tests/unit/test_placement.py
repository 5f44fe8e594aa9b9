import itertools

import pytest

from fedalign_dist.distributed.placement import (
    balanced_placement,
    block_placement,
    client_cost,
    clients_of_rank,
    rank_of_client,
    sample_clients,
)


def test_every_client_on_exactly_one_rank():
    for num_clients, world in [(8, 2), (7, 3), (1000, 2), (5, 5)]:
        hosted = [clients_of_rank(r, num_clients, world) for r in range(world)]
        assert sorted(c for h in hosted for c in h) == list(range(num_clients))
        assert max(map(len, hosted)) - min(map(len, hosted)) <= 1


def test_sampling_is_seeded_and_independent_of_placement():
    a = sample_clients(0, 3, 100, 10)
    assert a == sample_clients(0, 3, 100, 10) and len(set(a)) == 10
    assert a != sample_clients(1, 3, 100, 10) and a != sample_clients(0, 4, 100, 10)
    for world in (1, 2, 4):
        hosts = block_placement(a, 100, world)
        assert sorted(hosts) == a and all(hosts[c] == rank_of_client(c, 100, world) for c in a)


def _loads(hosts, costs_of, world):
    loads = [0.0] * world
    for client, rank in hosts.items():
        loads[rank] += costs_of[client]
    return loads


def test_balanced_placement_evens_out_what_blocks_leave_uneven():
    # sampled clients 0..5 of 16: home blocks put all six on rank 0, nothing on rank 1
    clients, costs = [0, 1, 2, 3, 4, 5], [240.0] * 6
    assert set(block_placement(clients, 16, 2).values()) == {0}
    hosts = balanced_placement(clients, costs, 2)
    assert sorted(hosts) == clients and _loads(hosts, dict(zip(clients, costs)), 2) == [720.0, 720.0]


def test_balanced_placement_is_longest_first_and_within_four_thirds_of_the_best():
    clients, costs = [3, 7, 9, 11, 12], [5.0, 4.0, 3.0, 3.0, 3.0]
    hosts = balanced_placement(clients, costs, 2)
    assert hosts == {3: 0, 7: 1, 9: 1, 11: 0, 12: 1}  # 5 | 4, then 3s onto the lighter rank
    best = min(max(sum(c for c, on in zip(costs, split) if on), sum(c for c, on in zip(costs, split) if not on))
               for split in itertools.product([0, 1], repeat=5))
    assert max(_loads(hosts, dict(zip(clients, costs)), 2)) <= 4 / 3 * best


def test_balanced_placement_is_a_pure_function_of_its_arguments():
    clients = sample_clients(0, 2, 1000, 50)
    costs = [float((c * 37) % 11 + 1) for c in clients]
    assert balanced_placement(clients, costs, 4) == balanced_placement(list(clients), list(costs), 4)
    with pytest.raises(ValueError, match="costs"):
        balanced_placement(clients, costs[:-1], 4)


def test_client_cost_counts_training_three_times():
    assert client_cost(80, 16) == 3 * 80 + 16
