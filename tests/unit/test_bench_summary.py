"""Benchmark summaries: mean +- std, curves over seeds, rounds to reach a target; grid specs."""
import math

import pytest

from fedalign_dist.benchmark.grid import load_grid
from fedalign_dist.benchmark.summary import fmt, mean_curve, mean_std, rounds_to_reach, rounds_to_reach_per_seed
from fedalign_dist.config import ConfigError


def test_mean_std_and_format():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_std([0.4]) == (0.4, 0.0)
    assert all(math.isnan(x) for x in mean_std([]))
    assert fmt(0.61234, 0.01) == "0.612 ± 0.010"


def test_mean_curve_and_rounds_to_reach():
    mean, std = mean_curve([[0.2, 0.5, 0.7], [0.4, 0.5, 0.9]])
    assert mean == pytest.approx([0.3, 0.5, 0.8]) and std[1] == 0.0
    assert rounds_to_reach(mean, 0.5) == 2
    assert rounds_to_reach(mean, 0.81) is None
    assert rounds_to_reach([None, 0.6], 0.5) == 2


@pytest.mark.parametrize("grid", ["configs/bench/quality.yaml", "configs/bench/pretrained.yaml",
                                  "configs/bench/privacy.yaml", "configs/bench/alignment.yaml"])
def test_every_cell_of_the_real_grids_is_a_valid_config(grid):
    """load_grid validates every cell, full and --quick (the slow suite runs the quick forms)."""
    spec = load_grid(grid)
    assert spec.scenarios and spec.methods


def test_the_real_grid_specs_load():
    spec = load_grid("configs/bench/quality.yaml")
    assert len(spec.candidates(False)) == 2 and spec.candidates(True) == [["local.lr=0.005"]]
    assert {"fedalign_mu0", "fedalign_uniform_c", "fedalign_beta_inf", "fedamole", "local"} <= set(spec.methods)


@pytest.mark.parametrize("tail,error", [
    ("scenarios: {a: [fed.rouds=2]}\nmethods: {m: []}\n", "did you mean 'fed.rounds'"),
    ("scenarios: {}\nmethods: {}\nsedes: [1]\n", "unknown grid keys"),
    ("scenarios: {a: []}\nmethods: {m: []}\nparallel: 0\n", "parallel must be >= 1"),
    ("scenarios: {a: []}\nmethods: {m: []}\ntune_by: {b: perplexity}\n", "tune_by names 'b', not one of the scenarios"),
    ("scenarios: {a: []}\nmethods: {m: []}\ntune_by: {a: rougeL}\n",
     "'rougeL' is not a metric of its task \\(accuracy, perplexity\\)"),
])
def test_grid_spec_is_validated_before_anything_runs(tmp_path, tail, error):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: configs/demo.yaml\nseeds: [0]\n" + tail)
    with pytest.raises(ConfigError, match=error):
        load_grid(bad)


def test_best_candidate_follows_the_metrics_direction():
    from fedalign_dist.benchmark.grid import best_candidate
    assert best_candidate([0.4, 0.6], "accuracy") == 1
    assert best_candidate([120.0, 95.0, 130.0], "perplexity") == 1   # lower is better
    assert best_candidate([None, float("nan"), 0.1], "rougeL") == 2   # a missing or NaN score never wins
    assert best_candidate([None, float("nan"), 200.0], "perplexity") == 2
    assert best_candidate([0.5, 0.5], "accuracy") == 0               # ties: the first candidate


def test_paired_difference_pairs_seeds_and_tests_them():
    from scipy.stats import ttest_rel

    from fedalign_dist.benchmark.summary import paired_difference
    method, reference = [0.50, 0.62, 0.55, 0.70, 0.58], [0.45, 0.60, 0.50, 0.61, 0.57]
    diff, p = paired_difference(method, reference)
    assert diff == pytest.approx(0.044) and p == pytest.approx(ttest_rel(method, reference).pvalue)
    assert 0.01 < p < 0.05  # consistent small gains: significant although the seeds' spread is larger
    diff, p = paired_difference([0.5, None, 0.7], [0.4, 0.3, None])  # one pair: no test
    assert diff == pytest.approx(0.1) and math.isnan(p)
    assert math.isnan(paired_difference([None], [0.4])[0])


def test_rounds_to_reach_per_seed_uses_each_seeds_own_reference_final():
    method = [[None, 0.3, None, 0.6], [None, 0.2, None, 0.25]]
    reference = [[None, 0.5, None, 0.55], [None, 0.1, None, float("nan")]]  # seed 1: last finite is 0.1
    assert rounds_to_reach_per_seed(method, reference) == [4, 2]
    assert rounds_to_reach_per_seed([[0.1, 0.2]], [[0.3, 0.4]]) == [None]
    assert rounds_to_reach_per_seed([[0.1]], [[None]]) == [None]
