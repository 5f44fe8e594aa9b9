import torch

from fedalign_dist.aggregation.weighted import (
    DENOMINATOR_KEY,
    finish_weighted_mean,
    weighted_mean,
    weighted_partial_sum,
)


def test_partial_sums_over_any_split_equal_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(5)]
    weights = [10, 3, 7, 1, 9]
    expected = {k: sum(w * d[k] for w, d in zip(weights, deltas)) / sum(weights) for k in ("a", "b")}
    whole = weighted_mean(deltas, weights)
    left = weighted_partial_sum(deltas[:2], weights[:2], deltas[0])
    right = weighted_partial_sum(deltas[2:], weights[2:], deltas[0])
    split = finish_weighted_mean({k: left[k] + right[k] for k in left})
    for k in expected:
        torch.testing.assert_close(whole[k], expected[k])
        torch.testing.assert_close(split[k], expected[k])


def test_empty_rank_contributes_zero():
    like = {"a": torch.ones(2)}
    empty = weighted_partial_sum([], [], like)
    assert float(empty[DENOMINATOR_KEY]) == 0 and torch.count_nonzero(empty["a"]) == 0
