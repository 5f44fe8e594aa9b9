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
