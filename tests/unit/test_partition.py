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
