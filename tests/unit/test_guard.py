"""The update guard (pure): non-finite updates and statistics are rejected; the norm bound
rejects or clips; an accepted update passes through unchanged."""
import math

import pytest
import torch

from fedalign_dist.aggregation.guard import nonfinite_names, screen_update, update_norm


def _delta(value=1.0):
    return {"a": torch.full((3, 4), value), "b": torch.full((5,), value)}


def test_finite_update_passes_unchanged():
    delta = _delta()
    verdict = screen_update(delta, {"usage": torch.ones(2, 4) / 4}, None, "reject")
    assert verdict.rejected is None and not verdict.clipped and verdict.delta is delta
    assert verdict.norm == pytest.approx(math.sqrt(17))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_update_is_rejected(bad):
    delta = _delta()
    delta["b"][2] = bad
    verdict = screen_update(delta, {}, None, "reject")
    assert verdict.rejected == "non-finite update in 1 of 2 tensors (first: b)"


def test_non_finite_statistics_are_rejected():
    stats = {"usage": torch.tensor([0.5, math.nan]), "tokens": torch.tensor([3, 4]), "signature": None}
    assert screen_update(_delta(), stats, None, "reject").rejected == "non-finite statistics: usage"


def test_norm_bound_rejects_or_clips():
    delta = _delta(2.0)  # norm 2 * sqrt(17)
    rejected = screen_update(delta, {}, 1.0, "reject")
    assert rejected.rejected.startswith("update norm 8.246 exceeds guard.max_update_norm=1")
    clipped = screen_update(delta, {}, 1.0, "clip")
    assert clipped.rejected is None and clipped.clipped
    assert update_norm(clipped.delta) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped.delta["a"] / delta["a"], torch.tensor(1.0 / (2 * math.sqrt(17))))
    assert screen_update(delta, {}, 100.0, "clip").delta is delta


def test_norm_of_a_huge_finite_update_does_not_overflow():
    assert update_norm({"a": torch.full((4,), 1e38)}) == pytest.approx(2e38)
    assert nonfinite_names({"a": torch.full((4,), 1e38), "b": torch.tensor([1, 2])}) == []



def _counts(shard):
    """What one shard contributes to the group's sums (as screen_update hands it to over_shards)."""
    seen = []
    screen_update(shard, {}, None, "reject", over_shards=lambda counts: seen.append(counts) or counts)
    return seen[0]


@pytest.mark.parametrize("max_norm, action, bad", [(None, "reject", False), (2.0, "clip", False),
                                                   (2.0, "reject", False), (None, "reject", True)])
def test_shards_of_an_update_reach_the_whole_updates_verdict(max_norm, action, bad):
    """Client groups: each rank screens its shard of the update, with the shards' counts summed
    over the group (norm 2.89 here, above the bound 2)."""
    delta = _delta(0.7)
    if bad:
        delta["b"][0] = math.nan
    shards = [{"a": delta["a"]}, {"b": delta["b"]}]
    summed = [sum(parts) for parts in zip(*map(_counts, shards))]  # what the group's all-reduce returns
    whole = screen_update(delta, {}, max_norm, action)
    verdicts = [screen_update(s, {}, max_norm, action, over_shards=lambda counts: summed) for s in shards]
    if bad:  # the shard without the NaN is rejected too
        assert all(v.rejected.startswith("non-finite update in 1 of 2 tensors") for v in [whole, *verdicts])
        return
    assert all(v.rejected == whole.rejected and v.clipped == whole.clipped for v in verdicts)
    assert all(v.norm == pytest.approx(whole.norm, rel=1e-12) for v in verdicts)
    for verdict, shard in zip(verdicts, shards):
        for name in shard:
            torch.testing.assert_close(verdict.delta[name], whole.delta[name])
