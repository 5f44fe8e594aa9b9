"""Pure summaries of finished runs: mean +- std over seeds, rounds to reach a target."""
from __future__ import annotations

import math


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); nan for none."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_curve(curves: list[list[float | None]]) -> tuple[list[float], list[float]]:
    """Per round mean and std over seeds (curves of equal length)."""
    out = [mean_std([c[i] for c in curves]) for i in range(min(len(c) for c in curves))]
    return [m for m, _ in out], [s for _, s in out]


def rounds_to_reach(curve: list[float], target: float) -> int | None:
    """First round (1-based count) at which the curve reaches the target; None if never."""
    for i, value in enumerate(curve):
        if value is not None and not math.isnan(value) and value >= target - 1e-12:
            return i + 1
    return None


def rounds_to_reach_per_seed(runs: list[list[float | None]],
                             reference_runs: list[list[float | None]]) -> list[int | None]:
    """For each seed, the first round at which a method's curve reaches the reference method's
    final score of the same seed (the mean curve's crossing can come from one lucky seed)."""
    out = []
    for curve, reference in zip(runs, reference_runs):
        final = next((v for v in reversed(reference) if v is not None and not math.isnan(v)), None)
        out.append(None if final is None else rounds_to_reach(curve, final))
    return out


def fmt(mean: float, std: float, digits: int = 3) -> str:
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired_difference(values: list[float | None], reference: list[float | None]) -> tuple[float, float]:
    """Mean of (value - reference) over the seeds both have, and the two-sided p value of a
    paired t-test (scipy's ttest_rel); p is nan below 2 pairs or when every difference is equal."""
    pairs = [(v, r) for v, r in zip(values, reference) if v is not None and r is not None]
    if not pairs:
        return math.nan, math.nan
    diffs = [v - r for v, r in pairs]
    mean = sum(diffs) / len(diffs)
    if len(pairs) < 2 or max(diffs) - min(diffs) < 1e-15:
        return mean, math.nan
    from scipy.stats import ttest_rel
    return mean, float(ttest_rel([v for v, _ in pairs], [r for _, r in pairs]).pvalue)
