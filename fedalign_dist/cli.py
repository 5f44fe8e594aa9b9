"""The `fedalign-dist` command (also `python -m fedalign_dist`).

  fedalign-dist train --config configs/demo.yaml fed.rounds=3      one rank (under torchrun/srun: each rank)
  fedalign-dist run --nproc 2 --config configs/demo.yaml           local multi-process run (one process per rank)
  fedalign-dist partition --config configs/demo.yaml               per-client label table + PNG
  fedalign-dist report runs/demo                                   summary.md + plots of a run folder
  fedalign-dist bench --grid configs/bench/quality.yaml --out DIR  a (scenario x method x seed) grid, resumable
  fedalign-dist bench --systems --out DIR                          time split, bytes per path, scale (2 ranks)
  fedalign-dist config show --config configs/demo.yaml             every key: value, type and documentation
  fedalign-dist diagnose --config configs/demo.yaml                do the clients' experts diverge? (table + verdict)

Code of your own (a strategy, data source or task type, with its config section): --import
MODULE on any command, or `imports: [MODULE]` in the config file; installed packages can
declare an entry point in the group fedalign_dist.plugins instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from fedalign_dist import json_files
from fedalign_dist.benchmark.cells import BenchmarkFailed
from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.distributed.rank_exit import end_rank

EPILOG = ("Overrides are dotted key=value pairs after the options, e.g. fed.rounds=3 local.lr=5e-4 "
          "strategy.name=fedprox. Unknown keys are errors.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedalign-dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", help="YAML config file (default: built-in defaults)")
        p.add_argument(
            "--import",
            dest="imports",
            action="append",
            default=[],
            metavar="MODULE",
            help="import MODULE before the config is validated (it registers strategies, data sources, task "
            "types); repeatable",
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. fed.rounds=3")
        return p

    with_config(sub.add_parser("train", help="run training in this process (one rank)", epilog=EPILOG))
    run = with_config(sub.add_parser("run", help="launch a local multi-process run (one process per rank)",
                                     epilog=EPILOG))
    run.add_argument("--nproc", type=int, default=2, help="number of ranks (processes) on this machine")
    part = with_config(sub.add_parser("partition", help="print the per-client label table and write a PNG",
                                      epilog=EPILOG))
    part.add_argument("--png", default=None, help="where to write the PNG (default: partition_<data>.png)")
    report = sub.add_parser("report", help="write RUN_DIR/summary.md and RUN_DIR/report/*.png from a run folder")
    report.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    bench = sub.add_parser("bench", help="run a benchmark (resumable) and write tables (.md, .json) and PNGs")
    suite = bench.add_mutually_exclusive_group(required=True)
    suite.add_argument("--grid", help="learning-quality grid YAML (e.g. configs/bench/quality.yaml)")
    from fedalign_dist.benchmark.systems import plan as systems_plan  # the help says what the suite runs
    scale, quick_scale = (max(systems_plan(q).scale_clients) for q in (False, True))
    suite.add_argument("--systems", action="store_true",
                       help=f"systems suite: time split per method, bytes per comm path, seconds and memory per "
                            f"round up to {scale:,} clients ({quick_scale:,} with --quick), framework overhead "
                            f"against plain torch")
    bench.add_argument("--out", required=True, help="results folder; rerunning resumes a half-finished benchmark")
    bench.add_argument("--quick", action="store_true",
                       help="a few minutes: grid = one seed, no tuning, its quick overrides; systems = tiny sizes")
    bench.add_argument("--parallel", type=int, default=None, help="grid cells run at once (default: the grid's)")
    bench.add_argument("--scenarios", default=None, metavar="A,B",
                       help="grid: only these scenarios (comma-separated; default: all)")
    bench.add_argument("--methods", default=None, metavar="A,B", help="grid: only these methods (default: all)")
    pre = sub.add_parser("pretrain", help="pretrain the small MoE base on public text (a Hugging Face checkpoint "
                                          "for model.path, with card.json: perplexity, expert roles, the command)")
    pre.add_argument("--out", required=True, help="checkpoint folder to write (refused if it exists)")
    pre.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the base's, 8000)")
    pre.add_argument("--seed", type=int, default=0,
                     help="seeds the held-out split, the initial weights and the batch order (default 0)")
    pre.add_argument("--dense", action="store_true",
                     help="a dense Llama decoder whose MLP is top-k experts wide (the same compute per token; "
                          "FedAMoLE's base) instead of the MoE")
    up = sub.add_parser("upcycle", help="turn a dense Llama-architecture checkpoint into an MoE whose experts copy "
                                        "its MLP (same function; a model.path for MoE strategies)")
    up.add_argument("--dense", required=True, help="the dense model: a local checkpoint, a .gguf file, or "
                                                   "package:smollm2-135m-instruct")
    up.add_argument("--experts", type=int, default=4, help="experts per layer (default 4)")
    up.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    up.add_argument("--perturb", type=float, default=0.0,
                    help="relative std of seeded noise that nudges the expert copies and routers apart (default 0: "
                         "exact copies, the dense model's function)")
    up.add_argument("--seed", type=int, default=0, help="seeds the --perturb noise (default 0)")
    up.add_argument("--out", required=True, help="checkpoint folder to write (refused if it exists)")
    diagnose_help = ("measure whether a federation's clients route differently and whether their same-numbered "
                     "experts play different roles (what FedAlign-MoE corrects): a table per layer, a verdict, JSON")
    diag = with_config(sub.add_parser(
        "diagnose", epilog=EPILOG, help=diagnose_help,
        description=diagnose_help + ". A sample of clients each trains one round from the config's model in this "
        "process; per layer over every pair of clients: routing Jensen-Shannon divergence, role agreement (is an "
        "expert's most similar expert on the other client the same number?), and the cosine of same-numbered "
        "experts against a maximum-weight matching's. Thresholds of the verdict: README, FedAlign-MoE section."))
    diag.add_argument(
        "--clients",
        type=int,
        default=None,
        help="clients sampled, each trained one round from the model (default: 8, at most fed.num_clients)",
    )
    diag.add_argument("--run", default=None, metavar="RUN_DIR",
                      help="instead of training: the routing statistics a finished FedAlign-MoE run recorded")
    diag.add_argument("--out", default=None, help="JSON to write (default: <run.output_dir>/<run.name>_diagnosis.json, "
                                                  "or RUN_DIR/diagnosis.json)")
    config = sub.add_parser("config", help="inspect configurations")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    with_config(config_sub.add_parser("show", help="print every key of the resolved config with its value, type "
                                                   "and documentation", epilog=EPILOG))
    return parser


def config_args(args) -> list[str]:
    """The overrides, with --import MODULE folded in (so every rank imports it, and the saved
    config.yaml records it)."""
    if not args.imports:
        return list(args.overrides)
    from fedalign_dist.config import read_raw
    listed = (read_raw(args.config).get("imports") or []) if args.config else []
    return list(args.overrides) + [f"imports={listed + args.imports}"]


def cmd_run(args) -> int:
    """The launcher: it checks through a child process and starts the ranks, and imports no
    torch (the config is validated by the child; rank processes do the rest)."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path
    overrides = config_args(args)
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (got {args.nproc})")
    rank_args = (["--config", args.config] if args.config else []) + overrides
    # fail once, before any rank starts; in a child process, so the launcher holds neither
    # the data nor torch, transformers and datasets for the whole run
    with tempfile.TemporaryDirectory(prefix="fedalign_checks_") as tmp:
        told = Path(tmp) / "checked.json"
        checked = subprocess.run([sys.executable, "-m", "fedalign_dist.launch_checks", "--nproc", str(args.nproc),
                                  "--tell", str(told), *rank_args])
        if checked.returncode != 0:
            return checked.returncode
        run_dir = Path(json.loads(told.read_text())["run_dir"])
    from fedalign_dist.distributed.local_launch import launch_local
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank; ranks share the cores
    return launch_local(args.nproc, rank_args, run_dir, args.argv)


def cmd_train(args) -> int:
    """One rank. Every failure ends the rank non-zero: a user error in one line (exit 2), a
    rank stopped by another rank's failure or a diverged run in one line (exit 1), any other
    exception with its traceback shown once: under torchrun it goes to the agent's error file
    (what torchrun.elastic's @record does), and torchrun prints it in its failure summary."""
    import faulthandler
    faulthandler.enable()  # a native crash in a rank prints every thread's Python stack
    from fedalign_dist.aggregation.guard import DivergedError
    from fedalign_dist.distributed.agreement import PeerFailure
    from fedalign_dist.distributed.local_launch import INTERRUPTED
    from fedalign_dist.train import train_main
    try:
        train_main(args.config, config_args(args))
        return 0
    except (PeerFailure, DivergedError) as err:
        print(f"fedalign-dist: {err}", file=sys.stderr, flush=True)
        return 1
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError):
        raise
    except Exception as err:
        if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
            raise  # no agent to report it: Python prints the traceback
        record_for_launcher(err)
        print(f"fedalign-dist: rank {os.environ.get('RANK', '?')} failed: {type(err).__name__}: {err} "
              f"(traceback in the launcher's failure report)", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: the launcher says what to do next
        return INTERRUPTED


def record_for_launcher(err: Exception) -> None:
    """The exception in torchrun's error file, as torch's ErrorHandler writes it, but through a
    temporary name and a rename: the agent stops the other ranks once one fails, and a rank
    stopped while writing left an empty file, which the agent then failed to parse (its own
    traceback instead of the run's failure summary; seen with a killed rank's partner)."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
    path = os.environ["TORCHELASTIC_ERROR_FILE"]
    os.environ["TORCHELASTIC_ERROR_FILE"] = f"{path}.{os.getpid()}.tmp"
    try:
        ErrorHandler().record_exception(err)
        os.replace(os.environ["TORCHELASTIC_ERROR_FILE"], path)
    finally:
        os.environ["TORCHELASTIC_ERROR_FILE"] = path


def cmd_partition(args) -> int:
    from fedalign_dist.data.federated import build_federated_data
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.plots import plot_label_table
    from fedalign_dist.train import quiet_libraries
    cfg = load_config(args.config, config_args(args))
    quiet_libraries()
    data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, build_tokenizer(cfg.data.tokenizer,
                                                                                          cfg.model.path))
    table = data.label_table("train")
    names = data.label_names
    width = max(8, *(len(n) + 1 for n in names))
    print(f"{cfg.data.name}, partition={cfg.data.partition}, {cfg.fed.num_clients} clients (train split)")
    print("client " + "".join(f"{n:>{width}}" for n in names) + f"{'total':>{width}}")
    for client, row in enumerate(table):
        print(f"{client:>6} " + "".join(f"{v:>{width}}" for v in row) + f"{row.sum():>{width}}")
    png = args.png or f"partition_{cfg.data.name}_{cfg.data.partition}.png"
    plot_label_table(table, names, png, title=f"{cfg.data.name} / {cfg.data.partition}")
    print(f"wrote {png}")
    return 0


def cmd_diagnose(args) -> int:
    from pathlib import Path

    from fedalign_dist.diagnose.command import default_out, diagnose_config, diagnose_run, render
    from fedalign_dist.train import quiet_libraries
    if args.run is not None and (args.config or args.overrides):
        raise ConfigError("diagnose --run RUN_DIR reads a finished run; it takes no --config or overrides")
    if args.clients is not None and args.clients < 2:
        raise ConfigError(f"--clients must be at least 2: clients are compared with each other (got {args.clients})")
    quiet_libraries()
    overrides = config_args(args)
    result = (diagnose_run(Path(args.run)) if args.run is not None
              else diagnose_config(args.config, overrides, args.clients))
    out = Path(args.out) if args.out else default_out(args.config, overrides, args.run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json_files.dumps(result, indent=1))
    print(render(result))
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from functools import partial
    from pathlib import Path
    log = partial(print, flush=True)
    if args.systems:
        from fedalign_dist.benchmark.systems import run_systems
        run_systems(Path(args.out), quick=args.quick, log=log)
        print(f"wrote {Path(args.out) / 'systems.md'}")
        return 0
    from fedalign_dist.benchmark.grid import load_grid, run_grid
    spec = load_grid(args.grid).only(args.scenarios, args.methods)
    if args.parallel is not None:
        if args.parallel < 1:
            raise ConfigError(f"--parallel must be >= 1 (got {args.parallel})")
        spec.parallel = args.parallel
    run_grid(spec, Path(args.out), quick=args.quick, log=log)
    print(f"wrote {Path(args.out) / 'results.md'}")
    return 0


def cmd_pretrain(args) -> int:
    import shlex
    from dataclasses import replace
    from functools import partial
    from pathlib import Path

    from fedalign_dist.pretrain.train import BaseSpec, pretrain
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists: pretraining writes a new checkpoint folder")
    spec = BaseSpec(seed=args.seed, dense=args.dense)
    if args.steps is not None:
        spec = replace(spec, steps=args.steps)
    if spec.steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {spec.steps})")
    command = "fedalign-dist " + " ".join(shlex.quote(a) for a in args.argv)
    pretrain(spec, out, command, log=partial(print, flush=True))
    return 0


def cmd_upcycle(args) -> int:
    from pathlib import Path

    from fedalign_dist.pretrain.upcycle_command import write_upcycled
    out = Path(args.out)
    write_upcycled(args.dense, out, args.experts, args.top_k, args.perturb, args.seed)
    print(f"wrote {out}: {args.experts} experts, top-{args.top_k} (model.path={out} data.tokenizer=model)")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Options may come before, between or after the key=value overrides (argparse alone stops
    collecting positionals at the first option)."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    args.argv = argv
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        if args.command == "train":
            code = cmd_train(args)
        elif args.command == "run":
            code = cmd_run(args)
        elif args.command == "bench":
            code = cmd_bench(args)
        elif args.command == "config":
            from fedalign_dist.config_docs import describe_config
            print(describe_config(load_config(args.config, config_args(args))))
            code = 0
        elif args.command == "diagnose":
            code = cmd_diagnose(args)
        elif args.command == "pretrain":
            code = cmd_pretrain(args)
        elif args.command == "upcycle":
            code = cmd_upcycle(args)
        elif args.command == "report":
            from fedalign_dist.report import write_report
            print(f"wrote {write_report(args.run_dir)}")
            code = 0
        else:
            code = cmd_partition(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"fedalign-dist: error: {err}", file=sys.stderr)
        code = 2
    except BenchmarkFailed as err:
        print(f"fedalign-dist: {err}", file=sys.stderr)
        code = 1
    if args.command == "train":
        end_rank(code)
    sys.exit(code)
