"""Systems benchmark: where a round's time goes, what the two communication paths send, and
how a run scales with the number of clients. Every cell is a real 2-rank run.

    fedalign-dist bench --systems --out results/systems [--quick]

  1. time split per method (demo config): local training, statistics pass, waiting for the
     slowest rank, communication (time inside collectives), aggregation math, evaluation;
  2. bytes sent per rank per round against clients per rank, FedAlign-MoE comm=reduce vs
     comm=allgather (one round, embeddings and LM head frozen so gathered deltas fit);
  3. seconds per round and peak RSS per rank against the number of clients (configs/scale.yaml,
     the same clients per round and the same examples per client).
Writes systems.json, systems.md, time_split.png, bytes_vs_clients.png, scale.png. Resumable
like the grid (finished cells are kept)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fedalign_dist.benchmark.cells import launch_cell, read_records
from fedalign_dist.benchmark.environment import environment_line
from fedalign_dist.config import load_config
from fedalign_dist.markdown import table

HEALTH_TWEETS = 63_325
"""Examples in the health_tweets data set: runs with fewer clients keep the same examples per client."""
SPLIT_KEYS = ("local", "stats", "wait", "comm", "aggregation", "eval")
METHODS = {
    "fedavg": ["strategy.name=fedavg"],
    "fedprox": ["strategy.name=fedprox"],
    "fedmoe": ["strategy.name=fedmoe"],
    "fedalign (reduce)": ["strategy.name=fedalign"],
    "fedalign (allgather)": ["strategy.name=fedalign", "strategy.fedalign.comm=allgather"],
    "fedamole": ["strategy.name=fedamole", "model.family=llama"],
}
TINY = ["data.max_examples=400", "data.min_client_examples=5", "local.batch_size=4", "eval.batch_size=64"]


@dataclass
class SystemsPlan:
    split_overrides: list[str]
    clients_per_rank: list[int]
    scale_clients: list[int]
    scale_overrides: list[str]


def plan(quick: bool) -> SystemsPlan:
    if quick:
        return SystemsPlan(split_overrides=["fed.rounds=2", "local.steps=2", *TINY],
                           clients_per_rank=[1, 4], scale_clients=[16, 64],
                           scale_overrides=["fed.rounds=2", "local.steps=1", "eval.global_examples=64"])
    return SystemsPlan(split_overrides=["fed.rounds=4", "local.steps=10"], clients_per_rank=[2, 8, 32],
                       scale_clients=[16, 100, 1000], scale_overrides=["fed.rounds=4"])


def _mean(records: list[dict], key: str) -> float:
    return sum(r.get(key) or 0.0 for r in records) / len(records)


def time_split(records: list[dict]) -> dict[str, float]:
    """Mean seconds per round by phase; communication is carved out of the aggregation time."""
    comm = _mean(records, "time_comm_s")
    return {"local": _mean(records, "time_local_s"), "stats": _mean(records, "time_stats_s"),
            "wait": _mean(records, "time_sync_s"), "comm": comm,
            "aggregation": max(_mean(records, "time_aggregate_s") - comm, 0.0),
            "eval": _mean(records, "time_eval_s"), "round": _mean(records, "time_round_s")}


def run_systems(out: Path, quick: bool = False, log=print) -> dict:
    p = plan(quick)
    out.mkdir(parents=True, exist_ok=True)
    demo = ["fed.num_clients=8", "fed.clients_per_round=8", "eval.every=1", *p.split_overrides]
    comm_common = ["strategy.name=fedalign", "data.partition=iid", "fed.rounds=1", "local.steps=1",
                   "eval.every=1000", "model.freeze=[embed_tokens,lm_head]", "data.min_client_examples=4"]
    scale_common = ["fed.clients_per_round=16", "eval.every=1000", *p.scale_overrides]
    cells = {f"split/{name}": ("configs/demo.yaml", demo + over) for name, over in METHODS.items()}
    for per_rank in p.clients_per_rank:
        for path in ("reduce", "allgather"):
            cells[f"comm/{path}_{per_rank}"] = ("configs/demo.yaml", comm_common + [
                f"fed.num_clients={2 * per_rank}", f"fed.clients_per_round={2 * per_rank}",
                f"strategy.fedalign.comm={path}"])
    for clients in p.scale_clients:
        examples = [] if clients >= 1000 else [f"data.max_examples={math.ceil(HEALTH_TWEETS * clients / 1000)}"]
        cells[f"scale/{clients}"] = ("configs/scale.yaml", scale_common + [f"fed.num_clients={clients}", *examples])
    for config, overrides in cells.values():
        load_config(config, overrides)  # every cell valid before anything runs
    for name, (config, overrides) in cells.items():
        log(f"systems {name}")
        launch_cell(config, 2, _cell_dir(out, name), overrides, log=log)
    results = collect(out, p)
    write_systems(out, results)
    return results


def _cell_dir(out: Path, name: str) -> Path:
    return out / name.replace(" ", "_").replace("(", "").replace(")", "")


def collect(out: Path, p: SystemsPlan) -> dict:
    split = {name: time_split(read_records(_cell_dir(out, f"split/{name}"))) for name in METHODS}
    comm = []
    for per_rank in p.clients_per_rank:
        row = {"clients_per_rank": per_rank}
        for path in ("reduce", "allgather"):
            row[path] = max(read_records(_cell_dir(out, f"comm/{path}_{per_rank}"))[0]["bytes_sent_per_rank"])
        comm.append(row)
    scale = []
    for clients in p.scale_clients:
        records = read_records(_cell_dir(out, f"scale/{clients}"))
        plain = records[:-1] or records  # the last round also evaluates the global model
        scale.append({"clients": clients, "s_per_round": _mean(plain, "time_round_s"),
                      "peak_rss_mb_per_rank": records[-1]["peak_rss_mb_per_rank"]})
    return {"time_split": split, "comm": comm, "scale": scale}


def write_systems(out: Path, results: dict) -> None:
    from fedalign_dist.plots import plot_lines, plot_stacked_bars
    split_rows = [[name] + [f"{row[k]:.3f}" for k in SPLIT_KEYS] + [f"{row['round']:.2f}"]
                  for name, row in results["time_split"].items()]
    comm_rows = [[row["clients_per_rank"], f"{row['reduce']:,}", f"{row['allgather']:,}",
                  f"{row['allgather'] / row['reduce']:.2f}"] for row in results["comm"]]
    scale_rows = [[f"{row['clients']:,}", f"{row['s_per_round']:.2f}",
                   ", ".join(str(round(x)) for x in row["peak_rss_mb_per_rank"])] for row in results["scale"]]
    lines = ["# Systems benchmark", "", environment_line(), "",
             "Every cell is a 2-rank run (gloo on CPU, NCCL on GPU), one run each.", "",
             "## Time split per round (demo config, 8 clients per round, seconds)", "",
             *table(["method", *SPLIT_KEYS, "round"], split_rows), "", "![time split](time_split.png)", "",
             "## Bytes sent per rank per round: FedAlign-MoE comm paths", "",
             *table(["clients per rank", "reduce", "allgather", "allgather / reduce"], comm_rows), "",
             "![bytes](bytes_vs_clients.png)", "",
             "## Scale: configs/scale.yaml, 16 clients per round, same examples per client", "",
             *table(["clients", "s/round", "peak RSS per rank (MB)"], scale_rows), "", "![scale](scale.png)", ""]
    (out / "systems.json").write_text(json.dumps(results, indent=1))
    (out / "systems.md").write_text("\n".join(lines))
    plot_stacked_bars({m: [row[k] for k in SPLIT_KEYS] for m, row in results["time_split"].items()}, SPLIT_KEYS,
                      out / "time_split.png", "seconds per round", "time split per round (2 ranks)")
    per_rank = [row["clients_per_rank"] for row in results["comm"]]
    plot_lines(per_rank, {path: [row[path] / 1e6 for row in results["comm"]] for path in ("reduce", "allgather")},
               out / "bytes_vs_clients.png", "clients per rank", "MB sent per rank per round", logy=True)
    clients = [row["clients"] for row in results["scale"]]
    plot_lines(clients, {"s/round": [row["s_per_round"] for row in results["scale"]]}, out / "scale.png",
               "clients", "seconds per round",
               right={"peak RSS MB (max rank)": [max(row["peak_rss_mb_per_rank"]) for row in results["scale"]]})
