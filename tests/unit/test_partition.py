import numpy as np
import pytest

from fedalign_dist.data.partition import PartitionError, label_table, partition, split_client

LABELS = np.repeat(np.arange(5), 60)


def _check_disjoint_cover(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())) == n


def test_iid_and_shards_cover_everything_once():
    for scheme in ("iid", "label_shards", "dirichlet"):
        parts = partition(LABELS, None, len(LABELS), 6, scheme, seed=0, alpha=0.5, min_size=5)
        _check_disjoint_cover(parts, len(LABELS))


def test_label_shards_limit_labels_per_client():
    parts = partition(LABELS, None, len(LABELS), 10, "label_shards", seed=1, shards_per_client=2)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_dirichlet_alpha_controls_skew():
    def skew(alpha):
        table = label_table(partition(LABELS, None, len(LABELS), 5, "dirichlet", seed=2, alpha=alpha), LABELS, 5)
        return (table.max(1) / table.sum(1)).mean()
    assert skew(0.05) > skew(100.0) + 0.3


def test_dirichlet_impossible_minimum_is_a_clear_error():
    with pytest.raises(PartitionError, match="data.alpha"):
        partition(LABELS, None, len(LABELS), 50, "dirichlet", seed=0, alpha=0.01, min_size=10)


def test_natural_needs_matching_client_count():
    groups = np.repeat(np.arange(3), 100)
    assert [len(p) for p in partition(LABELS, groups, len(LABELS), 3, "natural", seed=0)] == [100, 100, 100]
    with pytest.raises(PartitionError, match="fed.num_clients=3"):
        partition(LABELS, groups, len(LABELS), 4, "natural", seed=0)


def test_client_split_is_disjoint():
    split = split_client(np.arange(50), 0.1, 0.2, np.random.default_rng(0))
    assert len(split["test"]) == 10 and len(split["val"]) == 5 and len(split["train"]) == 35
    _check_disjoint_cover(list(split.values()), 50)


def test_sampled_gives_more_clients_than_examples_each_a_distinct_skewed_draw():
    parts = partition(LABELS, None, len(LABELS), 1000, "sampled", seed=0, alpha=0.1, min_size=5, per_client=12)
    assert len(parts) == 1000  # 1000 clients from 300 examples: clients share examples
    assert all(5 <= len(p) <= 12 and len(np.unique(p)) == len(p) and p.max() < len(LABELS) for p in parts)
    assert np.mean([len(p) for p in parts]) > 10  # repeats dropped are few
    table = label_table(parts, LABELS, 5)
    skewed = (table.max(1) / table.sum(1)).mean()
    even = label_table(partition(LABELS, None, len(LABELS), 1000, "sampled", seed=0, alpha=100.0, per_client=12),
                       LABELS, 5)
    assert skewed > (even.max(1) / even.sum(1)).mean() + 0.3  # alpha sets each client's label mix
    again = partition(LABELS, None, len(LABELS), 1000, "sampled", seed=0, alpha=0.1, min_size=5, per_client=12)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # a pure function of the seed
    unlabelled = partition(None, None, 50, 20, "sampled", seed=0, per_client=8)
    assert all(len(np.unique(p)) == len(p) and p.max() < 50 for p in unlabelled)


def test_sampled_needs_its_size_in_config():
    from fedalign_dist.config import load_config
    with pytest.raises(ValueError, match="examples_per_client"):
        load_config(None, ["data.partition=sampled"])
    with pytest.raises(ValueError, match="examples_per_client"):
        load_config(None, ["data.examples_per_client=20"])
    with pytest.raises(ValueError, match="min_client_examples"):
        load_config(None, ["data.partition=sampled", "data.examples_per_client=5"])
    assert load_config(None, ["data.partition=sampled", "data.examples_per_client=20"]).data.examples_per_client == 20
