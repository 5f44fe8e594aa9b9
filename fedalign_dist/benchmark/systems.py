"""Systems benchmark: where a round's time goes, what the two communication paths send, and
how a run scales with the number of clients. Every cell is a real 2-rank run.

    fedalign-dist bench --systems --out results/systems [--quick]

  1. time split per method (demo config, default evaluation cadence, means over the rounds):
     local training, statistics pass, waiting for the slowest rank, communication (time inside
     collectives), aggregation math, evaluation; evaluation's and waiting's shares of a round;
  2. bytes sent per rank per round against clients per rank, FedAlign-MoE comm=reduce vs
     comm=allgather (one round, embeddings and LM head frozen so gathered deltas fit);
  3. seconds per round and peak RSS per rank against the number of clients, up to 100,000
     (configs/scale.yaml: client state on disk, 16 clients per round; every client draws 63
     tweets, data.partition=sampled, so each has the same amount of data at any client count);
  4. framework overhead: FedAvg rounds without evaluation against the plain-torch floor of the
     same workload in the same process layout (benchmark/floor.py), runs alternated in pairs.
Writes systems.json, systems.md, time_split.png, bytes_vs_clients.png, scale.png. Resumable
like the grid (finished cells are kept)."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from fedalign_dist import json_files
from fedalign_dist.benchmark.cells import launch_cell, launch_floor, read_records
from fedalign_dist.benchmark.environment import environment_line
from fedalign_dist.config import load_config
from fedalign_dist.markdown import table

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
OVERHEAD_WORKLOAD = ["strategy.name=fedavg", "model.num_experts=8", "model.top_k=2", "data.tokenizer=byte",
                     "data.max_length=64", "fed.num_clients=16", "fed.clients_per_round=8", "local.batch_size=8",
                     "local.lr=1e-3"]
"""The tiny Mixtral preset with 8 experts top-2, byte tokens, sequences of 64, 16 clients, 8 per
round, local batches of 8, FedAvg (the workload the speed issue compared with Flower)."""


@dataclass
class SystemsPlan:
    split_methods: list[str]
    split_overrides: list[str]
    clients_per_rank: list[int]
    scale_clients: list[int]
    scale_overrides: list[str]
    overhead_overrides: list[str]
    overhead_pairs: int


def plan(quick: bool) -> SystemsPlan:
    if quick:
        # the quick form keeps the suite's code from rotting: two methods (one without and one with
        # a statistics pass) stand for all six, whose configs are still checked before anything runs
        return SystemsPlan(split_methods=["fedavg", "fedalign (reduce)"],
                           split_overrides=["fed.rounds=2", "local.steps=2", *TINY],
                           clients_per_rank=[1, 4], scale_clients=[16, 2000],
                           # a pool of 4,000 tweets to draw from: tokenising all 63,000 costs each process ~10 s
                           scale_overrides=["fed.rounds=2", "local.steps=1", "eval.global_examples=64",
                                            "data.max_examples=4000"],
                           overhead_overrides=["fed.rounds=4", "local.steps=3"], overhead_pairs=1)
    return SystemsPlan(split_methods=list(METHODS), split_overrides=["fed.rounds=5", "local.steps=10"],
                       clients_per_rank=[2, 8, 32],
                       scale_clients=[16, 1000, 100_000], scale_overrides=["fed.rounds=4"],
                       overhead_overrides=["fed.rounds=6", "local.steps=10"], overhead_pairs=3)


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
    # the default evaluation cadence: the split is what a default run spends per round
    demo = ["fed.num_clients=8", "fed.clients_per_round=8", *p.split_overrides]
    comm_common = ["strategy.name=fedalign", "data.partition=iid", "fed.rounds=1", "local.steps=1",
                   "eval.every=1000", "model.freeze=[embed_tokens,lm_head]", "data.min_client_examples=4"]
    scale_common = ["fed.clients_per_round=16", "eval.every=1000", "data.partition=sampled",
                    "data.examples_per_client=63", *p.scale_overrides]
    every_split = {f"split/{name}": ("configs/demo.yaml", demo + over) for name, over in METHODS.items()}
    cells = {f"split/{name}": every_split[f"split/{name}"] for name in p.split_methods}
    for per_rank in p.clients_per_rank:
        for path in ("reduce", "allgather"):
            cells[f"comm/{path}_{per_rank}"] = ("configs/demo.yaml", comm_common + [
                f"fed.num_clients={2 * per_rank}", f"fed.clients_per_round={2 * per_rank}",
                f"strategy.fedalign.comm={path}"])
    for clients in p.scale_clients:
        cells[f"scale/{clients}"] = ("configs/scale.yaml", scale_common + [f"fed.num_clients={clients}"])
    overhead = [*OVERHEAD_WORKLOAD, *p.overhead_overrides]
    no_eval = ["eval.every=1000", "eval.personalized_every=1000"]  # only the last round evaluates
    others = [cell for name, cell in cells.items() if not name.startswith("split/")]
    for config, overrides in [*every_split.values(), *others, ("configs/demo.yaml", overhead + no_eval)]:
        load_config(config, overrides)  # every cell valid before anything runs
    for name, (config, overrides) in cells.items():
        log(f"systems {name}")
        launch_cell(config, 2, _cell_dir(out, name), overrides, log=log)
    for pair in range(p.overhead_pairs):  # alternated: the machine's drift hits both alike
        log(f"systems overhead pair {pair}")
        launch_floor("configs/demo.yaml", 2, out / "overhead" / f"floor_{pair}.json", overhead)
        launch_cell("configs/demo.yaml", 2, out / "overhead" / f"framework_{pair}", overhead + no_eval, log=log)
    results = collect(out, p)
    write_systems(out, results)
    return results


def _cell_dir(out: Path, name: str) -> Path:
    return out / name.replace(" ", "_").replace("(", "").replace(")", "")


def collect(out: Path, p: SystemsPlan) -> dict:
    split = {name: time_split(read_records(_cell_dir(out, f"split/{name}"))) for name in p.split_methods}
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
    return {"time_split": split, "comm": comm, "scale": scale, "overhead": overhead_rows(out, p.overhead_pairs)}


def overhead_rows(out: Path, pairs: int) -> list[dict]:
    """Per pair: median seconds per round after the first of the floor and of the framework
    (whose last round, which evaluates, is left out), and their ratio."""
    rows = []
    for pair in range(pairs):
        floor = json.loads((out / "overhead" / f"floor_{pair}.json").read_text())["seconds_per_round"][1:]
        records = read_records(out / "overhead" / f"framework_{pair}")[1:-1]
        framework = [r["time_round_s"] for r in records]
        rows.append({"floor_s": statistics.median(floor), "framework_s": statistics.median(framework),
                     "wait_s": statistics.median(r["time_sync_s"] for r in records)})
        rows[-1]["ratio"] = rows[-1]["framework_s"] / rows[-1]["floor_s"]
    return rows


def write_systems(out: Path, results: dict) -> None:
    from fedalign_dist.plots import plot_lines, plot_stacked_bars
    split_rows = [[name] + [f"{row[k]:.3f}" for k in SPLIT_KEYS] + [f"{row['round']:.2f}"]
                  + [f"{100 * row[k] / row['round']:.0f} %" for k in ("eval", "wait")]
                  for name, row in results["time_split"].items()]
    comm_rows = [[row["clients_per_rank"], f"{row['reduce']:,}", f"{row['allgather']:,}",
                  f"{row['allgather'] / row['reduce']:.2f}"] for row in results["comm"]]
    base = results["scale"][0]
    scale_rows = [[f"{row['clients']:,}", f"{row['s_per_round']:.2f}",
                   ", ".join(str(round(x)) for x in row["peak_rss_mb_per_rank"]),
                   f"{row['s_per_round'] / base['s_per_round']:.2f}",
                   f"{max(row['peak_rss_mb_per_rank']) / max(base['peak_rss_mb_per_rank']):.2f}"]
                  for row in results["scale"]]
    overhead_rows_md = [[i, f"{row['floor_s']:.3f}", f"{row['framework_s']:.3f}", f"{row['wait_s']:.3f}",
                         f"{row['ratio']:.2f}"] for i, row in enumerate(results["overhead"])]
    lines = [
        "# Systems benchmark",
        "",
        environment_line(),
        "",
        "Every cell is a 2-rank run (gloo on CPU, NCCL on GPU), one run each.",
        "",
        "## Time split per round (demo config, 8 clients per round, seconds)",
        "",
        "Means over every round at the default evaluation cadence (global and personalised scores "
        "every 5 rounds and in the last).",
        "",
        *table(["method", *SPLIT_KEYS, "round", "eval share", "wait share"], split_rows),
        "",
        "![time split](time_split.png)",
        "",
        "## Bytes sent per rank per round: FedAlign-MoE comm paths",
        "",
        *table(["clients per rank", "reduce", "allgather", "allgather / reduce"], comm_rows),
        "",
        "![bytes](bytes_vs_clients.png)",
        "",
        "## Scale: configs/scale.yaml, 16 clients per round, 63 examples drawn per client",
        "",
        "Seconds per round over the rounds without global evaluation; ratios against the first row "
        "(RSS: the larger rank).",
        "",
        *table(["clients", "s/round", "peak RSS per rank (MB)", "s/round ratio", "RSS ratio"], scale_rows),
        "",
        "![scale](scale.png)",
        "",
        "## Framework overhead: FedAvg without evaluation against the plain-torch floor",
        "",
        "Tiny Mixtral, 8 experts top-2, byte tokens, sequences of 64, 16 clients, 8 per round; the floor "
        "runs the same clients, placement, batches and local steps in plain torch with one all_reduce "
        "(benchmark/floor.py). Median seconds per round after the first, pairs run alternately.",
        "",
        *table(
            ["pair", "floor s/round", "framework s/round", "waiting for the slower rank", "framework / floor"],
            overhead_rows_md,
        ),
        "",
    ]
    (out / "systems.json").write_text(json_files.dumps(results, indent=1))
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
