"""The privacy sweep's epsilon-accuracy table and plot, from a finished grid folder:

    fedalign-dist bench --grid configs/bench/privacy.yaml --out results/privacy
    python bench/privacy_sweep.py results/privacy [--scenario bbc_dir1.0]

Methods are named <strategy> (no DP), <strategy>_clip (DP with z = 0: clipping and uniform
weights only, epsilon infinite) and <strategy>_z<z>. Writes privacy_sweep.md and
privacy_sweep.png into the folder: final global and personalised accuracy (mean ± std over
seeds) against the final epsilon, and the time per round against the method without DP.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rows_of(runs: dict[str, list[list[dict]]]) -> list[dict]:
    """One row per method: strategy, level, epsilon, accuracies, seconds per round."""
    rows = []
    for method, seeds in runs.items():
        strategy, _, level = method.partition("_")
        last = [records[-1] for records in seeds]
        eps = [r.get("dp_epsilon", "off") for r in last]
        rows.append({
            "method": method, "strategy": strategy, "level": level or "no DP",
            "epsilon": None if "off" in eps else math.inf if None in eps else max(eps),
            "global": _mean_std([r.get("global_accuracy") for r in last]),
            "personalized": _mean_std([r.get("personalized_accuracy") for r in last]),
            "s_per_round": statistics.fmean(statistics.fmean(x["time_round_s"] for x in recs) for recs in seeds),
            "seeds": len(seeds)})
    return rows


def write_table(rows: list[dict], path: Path, scenario: str) -> None:
    base = {r["strategy"]: r["s_per_round"] for r in rows if r["level"] == "no DP"}
    lines = [f"# Privacy sweep: {scenario}", "",
             "| method | z | epsilon (delta 1e-5) | global accuracy | personalised accuracy | s/round | vs no DP |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["epsilon"] is None else "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.3g}"
        ratio = r["s_per_round"] / base[r["strategy"]] if r["strategy"] in base else math.nan
        lines.append(
            f"| {r['method']} | {r['level']} | {eps} | {r['global'][0]:.3f} ± {r['global'][1]:.3f} | "
            f"{r['personalized'][0]:.3f} ± {r['personalized'][1]:.3f} | {r['s_per_round']:.2f} | {ratio:.2f}x |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, scenario: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key in zip(axes, ("global", "personalized")):
        for i, strategy in enumerate(sorted({r["strategy"] for r in rows})):
            color = f"C{i}"
            finite = sorted((r for r in rows if r["strategy"] == strategy and r["epsilon"] is not None
                             and math.isfinite(r["epsilon"])), key=lambda r: r["epsilon"])
            if finite:
                ax.errorbar(
                    [r["epsilon"] for r in finite],
                    [r[key][0] for r in finite],
                    yerr=[r[key][1] for r in finite],
                    marker="o",
                    capsize=3,
                    color=color,
                    label=f"{strategy}, DP",
                )
            for r in rows:
                if r["strategy"] == strategy and (r["epsilon"] is None or math.isinf(r["epsilon"])):
                    style = ":" if r["epsilon"] is None else "--"
                    what = "no DP" if r["epsilon"] is None else "clip only (eps = inf)"
                    ax.axhline(r[key][0], linestyle=style, color=color, linewidth=1, label=f"{strategy}, {what}")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon at delta = 1e-5 (log)")
        ax.set_title(f"{key} accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (mean ± std)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{scenario}: accuracy against epsilon", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the grid's results folder (holds results.json)")
    parser.add_argument("--scenario", default=None, help="which scenario (default: the first)")
    args = parser.parse_args(argv)
    results = json.loads((args.folder / "results.json").read_text())["runs"]
    scenario = args.scenario or next(iter(results))
    rows = rows_of(results[scenario])
    write_table(rows, args.folder / "privacy_sweep.md", scenario)
    plot(rows, args.folder / "privacy_sweep.png", scenario)
    print((args.folder / "privacy_sweep.md").read_text())


if __name__ == "__main__":
    main()
