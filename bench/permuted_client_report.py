"""How much one client with permuted experts blurs the global model, per method (issue 16).

    python bench/permuted_client_report.py [--grid configs/bench/pretrained.yaml]
        [--scenario bbc_dir0.1] [--methods fedavg,fedalign,...]
        [--lr 0.001]

One round on the pretrained base, in this process (a world of one), with the grid's common
and scenario overrides: the round's sampled clients train from the global model as the
framework trains them, except the first, which receives the global model with experts 0
and 1 (and their router rows) swapped in every layer: the same function, a different
numbering, as a client whose experts drifted into each other's roles. Every method
aggregates (a) all updates and (b) the honest clients' alone. The blur of a layer is
max over e in (0, 1) of ||(a)[e] - (b)[e]|| / ||(b)[e]|| over expert e's weights (and the
same for router row e): 0 when the permuted client leaves experts 0 and 1 untouched; under FedAvg
about 1/n of the distance between the two experts' weights. Prints one table, writes
permuted_client.json beside it if --out is given."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWAPPED = (0, 1)


def swapped(state: dict, anatomy) -> dict:
    """The state with experts 0 and 1 (their weights and router rows) exchanged."""
    out = dict(state)
    a, b = SWAPPED
    for name in anatomy.names_of("router", "expert", among=state):
        t = state[name].clone()
        first = anatomy.expert_slice(name, state[name], a).clone()
        anatomy.put_expert(name, t, a, anatomy.expert_slice(name, state[name], b))
        anatomy.put_expert(name, t, b, first)
        out[name] = t
    return out


def blur(anatomy, together: dict, honest: dict, kind: str) -> list[float]:
    """Per MoE layer, max over e in (0, 1) of ||together[e] - honest[e]|| / ||honest[e]|| over
    that layer's tensors of `kind` (expert weights, or the router row)."""
    per_layer = []
    for layer in anatomy.layers():
        worst = 0.0
        names = [n for n in anatomy.names_of(kind, among=honest) if anatomy.role(n).layer == layer]
        for e in SWAPPED:
            diff = ref = 0.0
            for name in names:
                h = anatomy.expert_slice(name, honest[name], e).float()
                diff += float((anatomy.expert_slice(name, together[name], e).float() - h).pow(2).sum())
                ref += float(h.pow(2).sum())
            worst = max(worst, (diff / ref) ** 0.5)
        per_layer.append(worst)
    return per_layer


def one_method(cfg, data, tokenizer, env) -> dict:
    from fedalign_dist import run_lifecycle
    from fedalign_dist.distributed.placement import sample_clients
    from fedalign_dist.runner import Runner
    from fedalign_dist.strategies import ClientUpdate, build_strategy
    run_lifecycle.prepare(cfg)
    runner = Runner(cfg, env, data, tokenizer)
    anatomy, clients = runner.anatomy, runner.clients
    state = runner.global_state
    sampled = sample_clients(cfg.seed, 0, cfg.fed.num_clients, cfg.fed.clients_per_round)
    permuted = sampled[0]
    updates = []
    for cid in sampled:
        if cid != permuted:
            updates.append(clients.run(0, cid, state, evaluate=False).update)
            continue
        start = swapped(state, anatomy)
        u = clients.run(0, cid, start, evaluate=False).update
        delta = {n: d + start[n].float() - state[n].float() for n, d in u.delta.items()}  # trained - global
        updates.append(ClientUpdate(u.client_id, u.num_examples, delta, u.train_loss, u.stats))
    honest = [u for u in updates if u.client_id != permuted]
    # fresh strategies: aggregation may keep state (personal copies) between calls
    together, diag = build_strategy(cfg, anatomy, runner.store).aggregate(state, updates, runner.comm)
    alone, _ = build_strategy(cfg, anatomy, runner.store).aggregate(state, honest, runner.comm)
    return {
        "experts": blur(anatomy, together, alone, "expert"),
        "router_rows": blur(anatomy, together, alone, "router"),
        "aligned_fraction": diag.get("aligned_fraction"),
        "clients": len(updates),
        "permuted_client": permuted,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="configs/bench/pretrained.yaml",
                        help="benchmark grid to take the setting from")
    parser.add_argument("--scenario", default="bbc_dir0.1")
    parser.add_argument("--methods", default="fedavg,fedprox,fedmoe,fedalign,fedalign_robust,fedalign_as_specified,"
                                              "fedalign_beta_inf,fedalign_mu0,fedalign_uniform_c")
    parser.add_argument("--lr", type=float, default=0.001, help="local.lr for every method")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides added to every method's (e.g. strategy.fedalign.center_signatures=true)")
    parser.add_argument("--out", default=None, help="folder for permuted_client.json")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import yaml

    from fedalign_dist.config import load_config
    from fedalign_dist.data.federated import build_federated_data
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.distributed.env import init_distributed, shutdown
    from fedalign_dist.train import quiet_libraries
    grid = yaml.safe_load((REPO / args.grid).read_text())
    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="permuted_client_"))
    env = init_distributed("gloo")
    results = {}
    try:
        for method in args.methods.split(","):
            overrides = (grid["common"] + grid["scenarios"][args.scenario] + grid["methods"][method]
                         + [f"local.lr={args.lr}", f"run.output_dir={work}", f"run.name={method}"] + args.set)
            cfg = load_config(str(REPO / grid["base"]), overrides)
            tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.model.path)
            data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, tokenizer)
            results[method] = one_method(cfg, data, tokenizer, env)
            r = results[method]
            layers = lambda v: " ".join(f"{x:.3f}" for x in v)  # noqa: E731
            aligned = "-" if r["aligned_fraction"] is None else f"{r['aligned_fraction']:.3f}"
            print(f"{method:<24} expert blur per layer {layers(r['experts'])}   router-row blur per layer "
                  f"{layers(r['router_rows'])}   aligned fraction {aligned}", flush=True)
    finally:
        shutdown()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "permuted_client.json").write_text(json.dumps(
            {"scenario": args.scenario, "lr": args.lr, "set": args.set, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
