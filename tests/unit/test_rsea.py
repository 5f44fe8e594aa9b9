"""Reverse selection expert assignment: constraints, optimality against brute force, speed."""
import itertools
import time

import numpy as np
import pytest
import torch

from fedalign_dist.aggregation.rsea import InfeasibleAssignment, random_assignment, selection_scores, solve_assignment


def _valid(x, beta, max_experts, min_experts=2):
    return (x.sum(1) == beta).all() and (x.sum(0) >= min_experts).all() and (x.sum(0) <= max_experts).all()


def _brute_force(scores, beta, max_experts, min_experts=2):
    num_experts, num_clients = scores.shape
    best, best_x = -np.inf, None
    rows = [list(itertools.combinations(range(num_clients), beta)) for _ in range(num_experts)]
    for choice in itertools.product(*rows):
        x = np.zeros_like(scores, dtype=bool)
        for i, clients in enumerate(choice):
            x[i, list(clients)] = True
        if _valid(x, beta, max_experts, min_experts) and (scores * x).sum() > best:
            best, best_x = (scores * x).sum(), x
    return best, best_x


@pytest.mark.parametrize("seed", range(6))
def test_solution_meets_constraints_and_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_experts, num_clients, beta, max_experts = 4, 3, 2, 3
    scores = rng.random((num_experts, num_clients))
    x = solve_assignment(scores, beta, max_experts)
    assert _valid(x, beta, max_experts)
    best, _ = _brute_force(scores, beta, max_experts)
    assert (scores * x).sum() == pytest.approx(best, abs=1e-9)


def test_scores_are_softmax_over_clients():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = selection_scores(e, t)
    assert p.shape == (2, 3)
    torch.testing.assert_close(p.sum(1), torch.ones(2, dtype=torch.float64))
    z = torch.tensor([1.0, 0.0, 1.0]) / 2 ** 0.5
    torch.testing.assert_close(p[0], torch.softmax(z.double(), 0))


def test_infeasible_sizes_fail_with_a_clear_message():
    with pytest.raises(InfeasibleAssignment, match="2 x clients <= experts x expert_choices"):
        solve_assignment(np.ones((30, 1000)), beta=2, max_experts=8)
    with pytest.raises(InfeasibleAssignment):
        solve_assignment(np.ones((4, 10)), beta=2, max_experts=8)  # 8 < 20


def test_random_first_assignment_is_seeded_and_valid():
    a = random_assignment(30, 10, 2, 8, seed=1)
    assert _valid(a, 2, 8) and np.array_equal(a, random_assignment(30, 10, 2, 8, seed=1))
    assert not np.array_equal(a, random_assignment(30, 10, 2, 8, seed=2))


def test_fast_at_a_thousand_clients():
    rng = np.random.default_rng(0)
    scores = rng.random((30, 1000))
    t0 = time.perf_counter()
    x = solve_assignment(scores, beta=100, max_experts=8)
    elapsed = time.perf_counter() - t0
    assert _valid(x, 100, 8)
    assert elapsed < 30, elapsed
