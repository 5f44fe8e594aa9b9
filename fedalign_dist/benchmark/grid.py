"""Run a benchmark grid and write its results folder.

    fedalign-dist bench --grid configs/bench/quality.yaml --out results/quality [--quick]

Phases, all resumable (a cell whose run folder has summary.json is not run again; a
half-written one is restarted):
  1. tune   per (scenario, method): every candidate of the grid's `tune` budget (the same for
            every method), seed = first seed, evaluated on VALIDATION data; the best final
            accuracy picks the candidate (global accuracy; personalised for `local`, whose
            global model never changes).
  2. final  per (scenario, method, seed) with the chosen candidate, evaluated on TEST data.
  3. report results.json (every run's per-round metrics), results.md (mean +- std over seeds
            of the final round, rounds to reach FedAvg's final accuracy, time split), and
            convergence plots (accuracy per round, one line per method, shaded std).
--quick: first seed only, no tuning (first candidate), the grid's `quick` overrides.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedalign_dist.benchmark.summary import fmt, mean_curve, mean_std, rounds_to_reach
from fedalign_dist.config import ConfigError, load_config

PERSONAL_ONLY = {"local"}
"""Methods judged by personalised accuracy (their global model is the initial one)."""


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
    # every cell's configuration must be valid before anything runs
    for scenario, method in itertools.product(spec.scenarios.values(), spec.methods.values()):
        for candidate in spec.candidates(False):
            load_config(spec.base, spec.common + scenario + method + candidate + spec.quick)
            load_config(spec.base, spec.common + scenario + method + candidate)
    return spec


def _launch(spec: GridSpec, run_dir: Path, overrides: list[str]) -> None:
    if (run_dir / "summary.json").is_file():
        return  # finished before: resume the grid, not the run
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-written cell starts again
    cmd = [sys.executable, "-m", "fedalign_dist", "run", "--nproc", str(spec.nproc), "--config", spec.base,
           f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark cell {run_dir} failed ({done.returncode}):\n{done.stdout[-4000:]}")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _score(method: str, record: dict) -> float:
    key = "personalized_accuracy" if method in PERSONAL_ONLY else "global_accuracy"
    return record[key] if record.get(key) is not None else float("-inf")


def run_grid(spec: GridSpec, out: Path, quick: bool = False, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    extra = spec.quick if quick else []
    seeds = spec.seeds[:1] if quick else spec.seeds
    candidates = spec.candidates(quick)
    chosen: dict[str, dict[str, list[str]]] = {}
    for scenario, s_over in spec.scenarios.items():
        for method, m_over in spec.methods.items():
            base = spec.common + s_over + m_over + extra
            if len(candidates) > 1:
                scores = []
                for i, candidate in enumerate(candidates):
                    run_dir = out / "tune" / scenario / method / f"cand{i}"
                    log(f"tune  {scenario} / {method} / {' '.join(candidate)}")
                    _launch(spec, run_dir, base + candidate + [f"seed={seeds[0]}", "eval.split=val"])
                    scores.append(_score(method, _records(run_dir)[-1]))
                best = candidates[max(range(len(candidates)), key=scores.__getitem__)]
            else:
                best = candidates[0]
            chosen.setdefault(scenario, {})[method] = best
            for seed in seeds:
                log(f"final {scenario} / {method} / seed {seed}")
                _launch(spec, out / "runs" / scenario / method / f"seed{seed}",
                        base + best + [f"seed={seed}", "eval.split=test"])
    return write_results(spec, out, chosen, seeds)


def write_results(spec: GridSpec, out: Path, chosen: dict, seeds: list[int]) -> dict:
    from fedalign_dist.plots import plot_band_curves
    results = {"chosen": chosen, "runs": {}}
    lines = ["# Benchmark results", ""]
    for scenario in spec.scenarios:
        per_method = {m: [_records(out / "runs" / scenario / m / f"seed{s}") for s in seeds] for m in spec.methods}
        results["runs"][scenario] = per_method
        target = None
        if "fedavg" in per_method:
            target, _ = mean_std([recs[-1]["global_accuracy"] for recs in per_method["fedavg"]])
        lines += [f"## {scenario}", "", f"Overrides: `{' '.join(spec.scenarios[scenario])}`", "",
                  "| method | global acc | personalized acc | rounds to FedAvg's final | s/round | "
                  "local / stats / agg / eval s | MB sent/rank/round | chosen |", "|---|---|---|---|---|---|---|---|"]
        curves = {}
        for method, runs in per_method.items():
            glob = mean_std([r[-1]["global_accuracy"] for r in runs])
            pers = mean_std([r[-1]["personalized_accuracy"] for r in runs])
            curve, band = mean_curve([[x.get("global_accuracy") for x in r] for r in runs])
            curves[method] = (curve, band)
            reach = rounds_to_reach(curve, target) if target is not None else None
            split = " / ".join(f"{mean_std([sum(x.get(k) or 0 for x in r) / len(r) for r in runs])[0]:.2f}"
                               for k in ("time_local_s", "time_stats_s", "time_aggregate_s", "time_eval_s"))
            secs = mean_std([sum(x["time_round_s"] for x in r) / len(r) for r in runs])[0]
            sent = mean_std([sum(x["bytes_sent"] for x in r) / len(r) for r in runs])[0] / 1e6
            lines.append(f"| {method} | {fmt(*glob)} | {fmt(*pers)} | {reach if reach else 'not reached'} | "
                         f"{secs:.2f} | {split} | {sent:.2f} | `{' '.join(chosen[scenario][method]) or '-'}` |")
        png = out / f"convergence_{scenario}.png"
        plot_band_curves(curves, png, "global accuracy (test)", f"{scenario}: mean ± std over {len(seeds)} seed(s)")
        lines += ["", f"![{scenario}]({png.name})", ""]
    (out / "results.json").write_text(json.dumps(results))
    (out / "results.md").write_text("\n".join(lines))
    return results
