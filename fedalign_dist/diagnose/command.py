"""`fedalign-dist diagnose`: is this federation one where FedAlign-MoE has anything to align?

    fedalign-dist diagnose --config configs/demo.yaml [--clients 8] [--out FILE] [key=value ...]
    fedalign-dist diagnose --run RUN_DIR

With a config: a sample of clients each trains one round from the same model (the config's,
in this process, one rank), with FedAlign-MoE's statistics pass; their routing and expert
signatures are compared per layer (diagnose/premise.py), a matching's gain against its null
drawn from the same statistics (no retraining). With a finished run's folder: the
routing statistics it recorded (FedAlign-MoE runs record every sampled client's usage);
expert roles need signatures, which a run does not record, and the command says so.
Prints a table and a one-line verdict, writes JSON."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.diagnose.premise import as_json, premise, verdict
from fedalign_dist.markdown import table


def diagnose_config(config: str | None, overrides: list[str], clients: int | None) -> dict:
    user = load_config(config, overrides)
    if user.model.family == "llama":
        raise ConfigError("diagnose compares the experts and routers of a Mixture-of-Experts model; "
                          f"{'model.path ' + str(user.model.path) if user.model.path else 'model.family=llama'} is a "
                          "dense Llama model without a router: give an MoE (model.family=mixtral|qwen3_moe|olmoe|... "
                          "or model.path to an MoE checkpoint)")
    sample = min(clients or 8, user.fed.num_clients)
    if sample < 2:
        raise ConfigError(f"diagnose compares clients with each other: it needs at least 2 (--clients {sample}, "
                          f"fed.num_clients={user.fed.num_clients})")
    with tempfile.TemporaryDirectory(prefix="fedalign_diagnose_") as scratch:
        # FedAlign-MoE's statistics pass on the user's model and data; nothing is kept
        cfg = load_config(config, [*overrides, "strategy.name=fedalign", "privacy.enabled=false",
                                   f"fed.clients_per_round={sample}", "fed.client_state=memory", "checkpoint.every=0",
                                   f"run.output_dir={scratch}", "run.name=diagnose", "run.resume=false"])
        stats, layers = _one_round_statistics(cfg)
    ids = sorted(stats)
    usage, tokens, signature = (torch.stack([stats[c][k] for c in ids]) for k in ("usage", "tokens", "signature"))
    rows = premise(layers, usage, tokens, signature, cfg.strategy.fedalign.min_tokens,
                   center=cfg.strategy.fedalign.center_signatures)
    return as_json(
        rows,
        verdict(rows),
        {
            "source": f"config {config or '(defaults)'}",
            "clients": ids,
            "model": str(cfg.model.path or f"{cfg.model.family}/{cfg.model.preset}"),
            "data": f"{cfg.data.name}, partition={cfg.data.partition}",
            "local_steps": cfg.local.steps if cfg.local.epochs is None else f"{cfg.local.epochs} epochs",
            "signature": cfg.strategy.fedalign.signature,
            "center_signatures": cfg.strategy.fedalign.center_signatures,
        },
    )


def _one_round_statistics(cfg) -> tuple[dict[int, dict], list[int]]:
    """Each sampled client's statistics after one round of local training from the model."""
    from fedalign_dist import run_lifecycle
    from fedalign_dist.data.federated import build_federated_data
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.distributed.env import init_distributed, shutdown
    from fedalign_dist.distributed.placement import sample_clients
    from fedalign_dist.runner import Runner
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.model.path)
    data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, tokenizer)
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        run_lifecycle.prepare(cfg)
        runner = Runner(cfg, env, data, tokenizer)
        chosen = sample_clients(cfg.seed, 0, cfg.fed.num_clients, cfg.fed.clients_per_round)
        stats = {c: runner.clients.run(0, c, runner.global_state, evaluate=False).update.stats for c in chosen}
        return stats, runner.anatomy.layers()
    finally:
        shutdown()


def diagnose_run(run_dir: Path) -> dict:
    """Routing divergence from a finished run's records (the last round that has them)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no metrics.jsonl)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    usable = [r for r in records if (r.get("routing") or {}).get("client_usage")]
    again = f"fedalign-dist diagnose --config {run_dir / 'config.yaml'}"
    if not usable:
        strategy = records[-1].get("strategy", "?") if records else "?"
        raise ConfigError(f"{run_dir} records no per-client routing statistics (strategy {strategy}; FedAlign-MoE runs "
                          f"record them): `{again}` trains a sample of its clients for one round and measures them")
    last = usable[-1]
    per_client = last["routing"]["client_usage"]
    ids = sorted(per_client, key=int)
    usage = torch.tensor([per_client[c] for c in ids], dtype=torch.float64)
    layers = list(range(usage.shape[1]))
    # every expert counted active and one shared signature: only the routing columns mean anything
    rows = premise(layers, usage, torch.ones_like(usage), torch.ones(*usage.shape, 1, dtype=torch.float64),
                   null_draws=0)
    line = verdict(rows).rsplit("; ", 1)[1]
    return {"source": f"run {run_dir}, round {last['round']}", "clients": [int(c) for c in ids],
            "verdict": line[0].upper() + line[1:], "missing": f"expert roles: runs record no expert signatures; "
                                                               f"`{again}` measures them",
            "layers": [{"layer": r.layer, "routing_js_mean": r.routing_js_mean, "routing_js_max": r.routing_js_max}
                       for r in rows]}


def default_out(config: str | None, overrides: list[str], run_dir: str | None) -> Path:
    if run_dir is not None:
        return Path(run_dir) / "diagnosis.json"
    cfg = load_config(config, overrides)
    return cfg.run_dir.parent / f"{cfg.run.name}_diagnosis.json"


def render(result: dict) -> str:
    rows = result["layers"]
    if "role_agreement" in rows[0]:
        header = ["layer", "routing JS mean", "routing JS max", "role agreement", "any-pair cosine",
                  "same-number cosine", "matched cosine", "renumbered share", "matching gain",
                  "chance 99th percentile", "p (chance)"]
        body = [[r["layer"], f"{r['routing_js_mean']:.4f}", f"{r['routing_js_max']:.4f}", f"{r['role_agreement']:.0%}",
                 f"{r['any_pair_similarity']:.3f}", f"{r['same_number_similarity']:.3f}",
                 f"{r['matched_similarity']:.3f}", f"{r['moved_share']:.0%}", f"{r['matching_gain']:.3f}",
                 _number(r["matching_gain_null_q99"], ".3f"), _number(r["matching_gain_p"], ".3f")] for r in rows]
    else:
        header = ["layer", "routing JS mean", "routing JS max"]
        body = [[r["layer"], f"{r['routing_js_mean']:.4f}", f"{r['routing_js_max']:.4f}"] for r in rows]
    lines = [f"{result['source']}: clients {result['clients']}", "", *table(header, body), "", result["verdict"]]
    if "missing" in result:
        lines.append(f"not measured: {result['missing']}")
    return "\n".join(lines)


def _number(value, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)
