"""Flower side by side with fedalign_dist on the speed issue's workload: the tiny Mixtral preset
with 8 experts top-2, byte tokens, sequences of 64, 16 clients, 8 per round, 10 local steps of
batch 8, AdamW lr 1e-3, FedAvg, 2 workers (2 ranks here, 2 Ray actors there).

Flower lives in its own virtual environment, never a project dependency:

    python -m venv /tmp/flwr && /tmp/flwr/bin/pip install torch==2.13.0 \\
        && /tmp/flwr/bin/pip install "flwr[simulation]==1.41.0" transformers==5.23.0
    python bench/flower_side_by_side.py --flower-python /tmp/flwr/bin/python [--pairs 3] [--rounds 10]

1. `export` (this environment): the initial model (save_pretrained) and every client's batches
   for every round, built by the project's own data pipeline, so both sides train the same model
   on the same tokens.
2. Pairs of runs, alternated: Flower's simulation (`flower` mode, run by the Flower
   environment's Python: ClientApp trains in plain torch, ServerApp's FedAvg, no evaluation)
   and `fedalign-dist run` three times: without evaluation; at the default evaluation cadence
   (the global model and every trained client's personalised model every 5 rounds and in the
   last); and evaluating every round. Per run: mean and median seconds per round after the
   first (the mean carries the rounds that evaluate), launch-to-exit seconds, and peak PSS
   summed over the process tree (Ray's processes and our launcher included), sampled every 0.2 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_WORKER: dict = {}
WORKLOAD = ["strategy.name=fedavg", "model.num_experts=8", "model.top_k=2", "data.tokenizer=byte",
            "data.max_length=64", "fed.num_clients=16", "fed.clients_per_round=8", "local.steps=10",
            "local.batch_size=8", "local.lr=1e-3"]


def export(out: Path, rounds: int) -> None:
    sys.path.insert(0, str(REPO))
    from safetensors.torch import save_file

    from fedalign_dist.clients.trainer import client_batches
    from fedalign_dist.config import load_config
    from fedalign_dist.data.federated import build_federated_data
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.models.build import build_model
    from fedalign_dist.train import quiet_libraries
    quiet_libraries()
    cfg = load_config(str(REPO / "configs/demo.yaml"), WORKLOAD + [f"fed.rounds={rounds}"])
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, tokenizer)
    model, _ = build_model(cfg, tokenizer)
    model.save_pretrained(str(out / "model"))
    import torch
    for round_idx in range(rounds):
        for client in range(cfg.fed.num_clients):
            batches = list(client_batches(data, data.clients[client]["train"], cfg.local.steps,
                                          cfg.local.batch_size, cfg.seed, round_idx, client))
            save_file({f"{i}.{k}": v.contiguous() for i, b in enumerate(batches) for k, v in b.items()},
                      str(out / f"batches_r{round_idx}_c{client}.safetensors"))
    (out / "plan.json").write_text(json.dumps({
        "rounds": rounds, "num_clients": cfg.fed.num_clients, "per_round": cfg.fed.clients_per_round,
        "steps": cfg.local.steps, "lr": cfg.local.lr, "grad_clip": cfg.local.grad_clip,
        "num_train": [data.num_train(c) for c in range(cfg.fed.num_clients)], "torch": torch.__version__}))


def flower(folder: Path, timings: Path) -> None:
    """Runs inside the Flower environment."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    plan = json.loads((folder / "plan.json").read_text())
    client_app, server_app = ClientApp(), ServerApp()

    def model():
        # built once per worker process; the weights come with every message, as in Flower's examples
        if "model" not in _WORKER:
            torch.set_num_threads(1)
            _WORKER["model"] = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder / "model")))
        return _WORKER["model"]

    @client_app.train()
    def train(msg: Message, context: Context):
        net = model()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        net.train()
        client = int(context.node_config["partition-id"])
        round_idx = int(msg.content["config"]["server-round"]) - 1
        tensors = load_file(str(folder / f"batches_r{round_idx}_c{client}.safetensors"))
        optimizer = torch.optim.AdamW(net.parameters(), lr=plan["lr"])
        for step in range(plan["steps"]):
            batch = {k: tensors[f"{step}.{k}"] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
            loss = net(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), plan["grad_clip"])
            optimizer.step()
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                              "metrics": MetricRecord({"num-examples": plan["num_train"][client]})})
        return Message(content=content, reply_to=msg)

    marks = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=plan["per_round"] / plan["num_clients"], fraction_evaluate=0.0,
                          min_available_nodes=plan["num_clients"], min_train_nodes=plan["per_round"])
        initial = ArrayRecord(AutoModelForCausalLM.from_pretrained(str(folder / "model")).state_dict())
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=plan["rounds"],
                       evaluate_fn=lambda server_round, arrays: marks.append(time.perf_counter()) or None)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=plan["num_clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2}})
    timings.write_text(json.dumps({"seconds_per_round": [b - a for a, b in zip(marks, marks[1:])]}))


def measured(cmd: list[str]) -> tuple[float, float]:
    """(launch-to-exit seconds, peak PSS in GB of the process tree)."""
    import psutil
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    return time.perf_counter() - start, peak / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="compare", choices=["compare", "export", "flower"])
    parser.add_argument("--flower-python", help="the Python of the environment that has flwr[simulation]")
    parser.add_argument("--folder", help="export folder (export and flower modes)")
    parser.add_argument("--timings", help="where flower mode writes its round times")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.mode == "export":
        return export(Path(args.folder), args.rounds)
    if args.mode == "flower":
        return flower(Path(args.folder), Path(args.timings))
    if not args.flower_python:
        parser.error("--flower-python is needed to compare")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export(tmp / "export", args.rounds)
        rows = []
        for pair in range(args.pairs):
            timings = tmp / f"flower_{pair}.json"
            wall, pss = measured([args.flower_python, __file__, "flower", "--folder", str(tmp / "export"),
                                  "--timings", str(timings)])
            rounds = json.loads(timings.read_text())["seconds_per_round"]
            rows.append(("Flower 1.41 (2 Ray actors)", "none", rounds[1:], wall, pss))
            for tag, evaluation, settings in (
                    ("no_eval", "none", ["eval.every=1000", "eval.personalized_every=1000"]),
                    ("default", "default cadence: global and personalised every 5 rounds and the last", []),
                    ("every", "global and personalised every round", ["eval.every=1", "eval.personalized_every=1"])):
                name = f"ours_{pair}_{tag}"
                wall, pss = measured([sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config",
                                      str(REPO / "configs/demo.yaml"), *WORKLOAD, f"fed.rounds={args.rounds}",
                                      f"run.output_dir={tmp}", f"run.name={name}", "checkpoint.every=0",
                                      *settings])
                records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
                # without evaluation the last round is left out: it always evaluates
                kept = records[1:-1] if tag == "no_eval" else records[1:]
                rows.append(("fedalign_dist (2 ranks)", evaluation, [r["time_round_s"] for r in kept], wall, pss))
    print("| system | evaluation | s/round, mean after the first | median after the first | launch to exit (s) "
          "| peak PSS (GB) |")
    print("|---|---|---|---|---|---|")
    for name, evaluation, per_round, wall, pss in rows:
        print(f"| {name} | {evaluation} | {statistics.mean(per_round):.2f} | {statistics.median(per_round):.2f} "
              f"| {wall:.1f} | {pss:.2f} |")


if __name__ == "__main__":
    main()
