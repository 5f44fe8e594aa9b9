"""Run a benchmark grid and write its results folder.

    fedalign-dist bench --grid configs/bench/quality.yaml --out results/quality [--quick]

Phases, all resumable (a cell whose run folder has summary.json is not run again; a
half-written one is restarted):
  1. tune   per (scenario, method): every candidate of the grid's `tune` budget (the same for
            every method), seed = first seed, evaluated on VALIDATION data; the best final
            score picks the candidate: the task's headline metric (accuracy, or ROUGE-L), or
            the scenario's `tune_by` metric (e.g. perplexity, lower is better), of the global
            model, or of the personalised ones for a strategy whose `judged_by` says so
            (`local`, whose global model never changes).
  2. final  per (scenario, method, seed) with the chosen candidate, evaluated on TEST data.
  3. report results.json (every run's per-round metrics), results.md (mean +- std over seeds
            of the final round, rounds to reach the `reference` method's final score, time split), and
            convergence plots (the headline metric per round, one line per method, shaded std).
--quick: first seed only, no tuning (first candidate), the grid's `quick` overrides.
Cells are independent runs of `nproc` ranks; `parallel` of them run at once (results do not
depend on the rank count, so 2 one-rank cells on 2 cores beat one 2-rank cell: less waiting).
A failed cell does not stop the others; the grid reports every failure at the end.
"""
from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import yaml

from fedalign_dist import json_files
from fedalign_dist.benchmark.cells import BenchmarkFailed, launch_cell, read_records
from fedalign_dist.benchmark.environment import environment_line
from fedalign_dist.benchmark.summary import (
    fmt,
    mean_curve,
    mean_std,
    paired_difference,
    rounds_to_reach,
    rounds_to_reach_per_seed,
)
from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.markdown import table


@dataclass
class GridSpec:
    base: str
    seeds: list[int]
    scenarios: dict[str, list[str]]
    methods: dict[str, list[str]]
    common: list[str] = field(default_factory=list)
    tune: dict[str, list] = field(default_factory=dict)
    quick: list[str] = field(default_factory=list)
    nproc: int = 2
    parallel: int = 1
    reference: Optional[str] = None
    """A method whose final global accuracy (mean over seeds) sets the target of the column
    "rounds to reach" for every method; None: no such column."""
    tune_by: dict[str, str] = field(default_factory=dict)
    """scenario -> the validation metric that picks its candidate where not the task's headline
    (e.g. perplexity when ROUGE-L sits near 0 and would pick by noise); its scores join the table."""

    def only(self, scenarios: str | None, methods: str | None) -> "GridSpec":
        """The grid narrowed to comma-separated scenario and method names (None: all); the
        reference method, if left out, drops its column."""
        picked = {}
        for kind, names in (("scenarios", scenarios), ("methods", methods)):
            table = getattr(self, kind)
            wanted = list(table) if names is None else [n.strip() for n in names.split(",") if n.strip()]
            unknown = [n for n in wanted if n not in table]
            if unknown or not wanted:
                raise ConfigError(f"--{kind}: unknown {', '.join(unknown) or '(none given)'}; the grid has "
                                  f"{', '.join(table)}")
            picked[kind] = {n: table[n] for n in wanted}
        reference = self.reference if self.reference in picked["methods"] else None
        return replace(self, reference=reference, **picked)

    def candidates(self, quick: bool) -> list[list[str]]:
        if not self.tune:
            return [[]]
        keys = list(self.tune)
        combos = [[f"{k}={v}" for k, v in zip(keys, values)] for values in itertools.product(*self.tune.values())]
        return combos[:1] if quick else combos


def load_grid(path: str | Path) -> GridSpec:
    raw = yaml.safe_load(Path(path).read_text())
    known = set(GridSpec.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {sorted(unknown)} (known: {sorted(known)})")
    spec = GridSpec(**raw)
    if spec.nproc < 1 or spec.parallel < 1:
        raise ConfigError(f"{path}: nproc and parallel must be >= 1 (got {spec.nproc}, {spec.parallel})")
    if spec.reference is not None and spec.reference not in spec.methods:
        raise ConfigError(f"{path}: reference '{spec.reference}' is not one of the methods ({', '.join(spec.methods)})")
    for scenario, metric in spec.tune_by.items():
        if scenario not in spec.scenarios:
            raise ConfigError(f"{path}: tune_by names '{scenario}', not one of the scenarios "
                              f"({', '.join(spec.scenarios)})")
        metrics = task_metrics(spec, spec.common + spec.scenarios[scenario])
        if metric not in metrics:
            raise ConfigError(f"{path}: tune_by {scenario}: '{metric}' is not a metric of its task "
                              f"({', '.join(metrics)})")
    # every cell's configuration must be valid before anything runs
    for scenario, method in itertools.product(spec.scenarios.values(), spec.methods.values()):
        for candidate in spec.candidates(False):
            load_config(spec.base, with_seed(spec.common + scenario + method + candidate + spec.quick, spec.seeds[0]))
            load_config(spec.base, with_seed(spec.common + scenario + method + candidate, spec.seeds[0]))
    return spec


def with_seed(overrides: list[str], seed: int) -> list[str]:
    """Overrides with `{seed}` replaced by the cell's seed (e.g. privacy.noise_seed={seed})."""
    return [o.replace("{seed}", str(seed)) for o in overrides]


def _tune_dir(out: Path, scenario: str, method: str, candidate: int) -> Path:
    return out / "tune" / scenario / method / f"cand{candidate}"


LOWER_IS_BETTER = frozenset({"perplexity"})


def judged_key(spec: GridSpec, overrides: list[str], metric: str) -> str:
    """The metrics key that measures a cell: the strategy says which model ('global' or
    'personalized'), `metric` which of the task's metrics."""
    from fedalign_dist.strategies import strategy_class
    cfg = load_config(spec.base, overrides)
    return f"{strategy_class(cfg.strategy.name).judged_by}_{metric}"


def task_metrics(spec: GridSpec, overrides: list[str]) -> tuple[str, ...]:
    from fedalign_dist.data.registry import task_class
    return task_class(load_config(spec.base, overrides).data.task).metrics


def headline_metric(spec: GridSpec, overrides: list[str]) -> str:
    return task_metrics(spec, overrides)[0]


def tuning_metric(spec: GridSpec, scenario: str) -> str:
    return spec.tune_by.get(scenario) or headline_metric(spec, spec.common + spec.scenarios[scenario])


def best_candidate(scores: list[float | None], metric: str) -> int:
    """Index of the best score (the lowest for a LOWER_IS_BETTER metric); a missing or NaN score
    never wins; ties go to the first candidate."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    ranked = [sign * s if s is not None and not math.isnan(s) else float("-inf") for s in scores]
    return max(range(len(ranked)), key=ranked.__getitem__)


def _run_cells(spec: GridSpec, cells: list[tuple[str, Path, list[str]]], log) -> None:
    """Run (label, run_dir, overrides) cells, `spec.parallel` at a time; raise after all if any failed."""
    def one(cell):
        label, run_dir, overrides = cell
        log(label)
        try:
            launch_cell(spec.base, spec.nproc, run_dir, overrides, log=log)
        except BenchmarkFailed as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=spec.parallel) as pool:
        failures = [f for f in pool.map(one, cells) if f]
    if failures:
        raise BenchmarkFailed(f"{len(failures)} benchmark cell(s) failed (finished cells are kept; rerun to resume):\n"
                           + "\n".join(failures))


def run_grid(spec: GridSpec, out: Path, quick: bool = False, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    extra = spec.quick if quick else []
    seeds = spec.seeds[:1] if quick else spec.seeds
    candidates = spec.candidates(quick)
    pairs = [(scenario, method, spec.common + s_over + m_over + extra)
             for scenario, s_over in spec.scenarios.items() for method, m_over in spec.methods.items()]
    tuning = len(candidates) > 1
    if tuning:
        _run_cells(spec, [(f"tune  {scenario} / {method} / {' '.join(candidate)}", _tune_dir(out, scenario, method, i),
                           with_seed(base + candidate, seeds[0]) + [f"seed={seeds[0]}", "eval.split=val"])
                          for scenario, method, base in pairs for i, candidate in enumerate(candidates)], log)
    chosen: dict[str, dict[str, list[str]]] = {}
    for scenario, method, base in pairs:
        best = 0
        if tuning:
            metric = tuning_metric(spec, scenario)
            judged = judged_key(spec, with_seed(base, seeds[0]), metric)
            scores = [read_records(_tune_dir(out, scenario, method, i))[-1].get(judged) for i in range(len(candidates))]
            best = best_candidate(scores, metric)
        chosen.setdefault(scenario, {})[method] = candidates[best]
    # seed-major, so that an interrupted grid holds whole seeds, comparable across methods
    _run_cells(spec, [(f"final {scenario} / {method} / seed {seed}", out / "runs" / scenario / method / f"seed{seed}",
                       with_seed(base + chosen[scenario][method], seed) + [f"seed={seed}", "eval.split=test"])
                      for seed in seeds for scenario, method, base in pairs], log)
    return write_results(spec, out, chosen, seeds)


def _bold_best(value: tuple[float, float], best: float | None) -> str:
    text = fmt(*value)
    return f"**{text}**" if best is not None and value[0] == best else text


def paired_table(spec: GridSpec, per_method: dict, keys: tuple[str, ...]) -> list[str]:
    """Each method's final score minus the reference method's, paired by seed, with the paired
    t-test's p value (two-sided); nothing without a reference or with one seed."""
    if spec.reference is None or len(per_method[spec.reference]) < 2:
        return []
    finals = {m: {key: [r[-1].get(key) for r in runs] for key in keys} for m, runs in per_method.items()}
    curves = {m: [[x.get(keys[0]) for x in r] for r in runs] for m, runs in per_method.items()}

    def reach_text(method):
        return ", ".join(str(n) if n else "-" for n in rounds_to_reach_per_seed(curves[method], curves[spec.reference]))
    rows = []
    for method in (m for m in per_method if m != spec.reference):
        cells = []
        for key in keys:
            diff, p = paired_difference(finals[method][key], finals[spec.reference][key])
            cells += ["-" if math.isnan(diff) else f"{diff:+.3f}", "-" if math.isnan(p) else f"{p:.3g}"]
        rows.append([method, *cells, reach_text(method)])
    header = [f"paired against {spec.reference} (seeds)"]
    for key in keys:
        header += [f"{key.replace('_', ' ')} difference", "p"]
    header.append(f"rounds to the same seed's {spec.reference} final ({spec.reference}: {reach_text(spec.reference)})")
    return [*table(header, rows), ""]


def write_results(spec: GridSpec, out: Path, chosen: dict, seeds: list[int]) -> dict:
    from fedalign_dist.plots import plot_band_curves
    results = {"chosen": chosen, "runs": {}}
    lines = ["# Benchmark results", "", environment_line(), "",
             f"Base config `{spec.base}`; common overrides `{' '.join(spec.common) or '-'}`; seeds {seeds}; "
             f"{spec.nproc} rank(s) per run. Scores (the task's headline metric: accuracy, or ROUGE-L for "
             f"instruction tuning) are the final round's on test data, mean ± std over seeds; the tuning budget "
             f"{spec.tune or '-'} was spent per (scenario, method) on validation data with seed {seeds[0]}, picking "
             f"by the headline metric" + "".join(f"; {name}: by {m}" for name, m in spec.tune_by.items()
                                                 if name in spec.scenarios)
             + ". Best mean per column in bold.", ""]
    for scenario in spec.scenarios:
        per_method = {m: [read_records(out / "runs" / scenario / m / f"seed{s}") for s in seeds] for m in spec.methods}
        results["runs"][scenario] = per_method
        metric = headline_metric(spec, spec.common + spec.scenarios[scenario])
        glob, pers = f"global_{metric}", f"personalized_{metric}"
        tuned_by = tuning_metric(spec, scenario)
        extra = [f"global_{tuned_by}", f"personalized_{tuned_by}"] if tuned_by != metric else []
        target = None
        if spec.reference is not None:
            target, _ = mean_std([recs[-1][glob] for recs in per_method[spec.reference]])
        curves, rows = {}, []
        finals = {key: {m: mean_std([r[-1][key] for r in runs]) for m, runs in per_method.items()}
                  for key in (glob, pers, *extra)}
        best = {key: (min if key.split("_", 1)[1] in LOWER_IS_BETTER else max)(
                    (v[0] for v in column.values() if not math.isnan(v[0])), default=None)
                for key, column in finals.items()}
        for method, runs in per_method.items():
            curve, band = mean_curve([[x.get(glob) for x in r] for r in runs])
            curves[method] = (curve, band)
            reach = rounds_to_reach(curve, target) if target is not None else None
            split = " / ".join(f"{mean_std([sum(x.get(k) or 0 for x in r) / len(r) for r in runs])[0]:.2f}"
                               for k in ("time_local_s", "time_stats_s", "time_aggregate_s", "time_eval_s"))
            secs = mean_std([sum(x["time_round_s"] for x in r) / len(r) for r in runs])[0]
            sent = mean_std([sum(x["bytes_sent"] for x in r) / len(r) for r in runs])[0] / 1e6
            sent_text = f"{sent:.2f}" if spec.nproc > 1 else "- (1 rank)"
            aligned = [r[-1].get("aligned_fraction") for r in runs]
            aligned_text = "-" if None in aligned else fmt(*mean_std(aligned))
            eps = [r[-1].get("dp_epsilon", "off") for r in runs]
            eps_text = "-" if "off" in eps else "inf" if None in eps else f"{max(eps):.3g}"
            rows.append([method, *(_bold_best(finals[key][method], best[key]) for key in (glob, pers, *extra)),
                         reach if reach else "not reached", aligned_text, eps_text, f"{secs:.2f}", split, sent_text,
                         f"`{' '.join(chosen[scenario][method]) or '-'}`"])
        png = out / f"convergence_{scenario}.png"
        plot_band_curves(curves, png, f"global {metric} (test)", f"{scenario}: mean ± std over {len(seeds)} seed(s)")
        pictures = [f"![{scenario}]({png.name})"]
        if extra:  # the tuning metric's curves too
            tuned_png = out / f"convergence_{scenario}_{tuned_by}.png"
            tuned_curves = {m: mean_curve([[x.get(extra[0]) for x in r] for r in runs])
                            for m, runs in per_method.items()}
            plot_band_curves(tuned_curves, tuned_png, f"global {tuned_by} (test)",
                             f"{scenario}: mean ± std over {len(seeds)} seed(s)")
            pictures.append(f"![{scenario}, {tuned_by}]({tuned_png.name})")
        lines += [f"## {scenario}", "", f"Overrides: `{' '.join(spec.scenarios[scenario])}`", "",
                  *table(["method", f"global {metric}", f"personalized {metric}",
                          *(key.replace("_", " ") for key in extra), f"rounds to {spec.reference or '-'}'s final",
                          "aligned fraction", "epsilon", "s/round",
                          "local / stats / agg / eval s", "MB sent/rank/round", "chosen"], rows),
                  "", *paired_table(spec, per_method, (glob, pers)), *pictures, ""]
    (out / "results.json").write_text(json_files.dumps(results))
    (out / "results.md").write_text("\n".join(lines))
    return results
