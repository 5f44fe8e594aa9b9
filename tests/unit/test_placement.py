from fedalign_dist.dist.placement import clients_of_rank, rank_of_client, round_clients_on_rank, sample_clients


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
        union = sorted(c for r in range(world) for c in round_clients_on_rank(0, 3, 100, 10, r, world))
        assert union == a
        for r in range(world):
            assert all(rank_of_client(c, 100, world) == r for c in round_clients_on_rank(0, 3, 100, 10, r, world))
