"""`fedalign-dist report RUN_DIR`: a run folder -> summary.md and PNG plots (curves of the
task's headline metric: accuracy, or ROUGE-L for instruction tuning;
routing distribution per client as a heat map, aligned fraction over rounds)."""
from __future__ import annotations

import json
from pathlib import Path

from fedalign_dist.markdown import table
from fedalign_dist.plots import plot_curves, plot_routing_heatmap
from fedalign_dist.run_manifest import record_written


def load_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a fedalign_dist run folder?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} is empty: the run has not finished a round yet")
    return records


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 or value == 0 else f"{value:.4f}"
    return str(value)


def headline_metric(run_dir: Path) -> str:
    """The task's first metric (data.json; runs from before it existed: accuracy)."""
    described = run_dir / "data.json"
    if described.is_file():
        return json.loads(described.read_text()).get("metrics", ["accuracy"])[0]
    return "accuracy"


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    metric = headline_metric(run_dir)
    glob, pers = f"global_{metric}", f"personalized_{metric}"
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    rounds = [r["round"] for r in records]
    plots = []
    plot_curves(rounds, {"global": [r.get(glob) for r in records], "personalized": [r.get(pers) for r in records]},
                out / f"{metric}.png", metric, f"{records[-1]['strategy']}: {metric} per round")
    plots.append((f"{metric} per round", f"{metric}.png"))
    if any("aligned_fraction" in r for r in records):
        plot_curves(rounds, {"aligned fraction": [r.get("aligned_fraction") for r in records],
                             "consistency (mean)": [r.get("consistency_mean") for r in records]},
                    out / "alignment.png", "fraction", "FedAlign-MoE: aligned fraction and routing consistency")
        plots.append(("aligned fraction over rounds", "alignment.png"))
    last_routing = next((r["routing"] for r in reversed(records) if r.get("routing")), None)
    if last_routing and last_routing.get("client_usage"):
        plot_routing_heatmap(last_routing["client_usage"], out / "routing.png",
                             "routing per client (last logged round)")
        plots.append(("routing distribution per client", "routing.png"))

    evaluated = [r for r in records if r.get(glob) is not None]
    best = max(evaluated, key=lambda r: r[glob]) if evaluated else None
    last = records[-1]
    rows = [("strategy", last["strategy"]), ("rounds", len(records)),
            (f"final global {metric}", last.get(glob)),
            (f"final personalized {metric}", last.get(pers)),
            (f"best global {metric} (round)", f"{best[glob]:.4f} ({best['round']})" if best else None),
            ("mean seconds per round", _mean(records, "time_round_s")),
            ("mean local / stats / aggregate / eval seconds", " / ".join(
                f"{_mean(records, k) or 0:.3f}" for k in ("time_local_s", "time_stats_s", "time_aggregate_s",
                                                         "time_eval_s"))),
            ("mean bytes sent per rank per round", _mean(records, "bytes_sent")),
            ("peak RSS per rank (MB)", max(r["peak_rss_mb"] for r in records))]
    if "dp_delta" in last:  # privacy.enabled
        eps = last.get("dp_epsilon")
        rows.append(("epsilon (delta) after the last round",
                     f"{'inf (no noise)' if eps is None else f'{eps:.4g}'} ({last['dp_delta']:g})"))
    metric_rows = [[name, _cell(value)] for name, value in rows]
    round_rows = [[r["round"], _cell(r.get(glob)), _cell(r.get(pers)), _cell(r.get("train_loss"))] for r in records]
    lines = [f"# Run report: {run_dir.name}", "", *table(["metric", "value"], metric_rows), "",
             *table(["round", f"global {metric}", f"personalized {metric}", "train loss"], round_rows)]
    lines += [""] + [f"![{title}](report/{name})" for title, name in plots] + [""]
    summary = run_dir / "summary.md"
    summary.write_text("\n".join(lines))
    record_written(run_dir, *(out / name for _, name in plots))  # not report/ whole: a user's file may be there
    return summary
