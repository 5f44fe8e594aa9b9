"""How far a grouped run lands from an ungrouped one, against how far the ungrouped path lands
from itself when only the number of ranks changes. The same clients, seed and rounds are run
three ways: 4 ranks as 2 groups of 2 (fed.ranks_per_client=2), 2 ranks of 1 (the reference),
and 1 rank hosting every client; the table gives each final global state's relative L2
difference from the reference, and its largest element difference.

    python bench/client_groups_equality.py [--cases fedavg,fedavg4,fedalign4] [key=value ...]
    # ~2 min on 2 cores

The second column is the floor of any comparison with that reference: moving clients between
ranks changes only the order in which their updates are summed, and AdamW's first steps (about
lr x sign(gradient)) turn last-bit differences into lr-sized ones where a gradient is near zero.
Defaults: configs/demo.yaml with the tests' tiny settings, the model's own losses on (the
router's load-balancing loss, FedAlign-MoE's routing regulariser: a group computes them over its
whole batch, clients/group_batch.py)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_examples=400", "data.max_length=64", "data.min_client_examples=5", "local.steps=3",
        "local.batch_size=4", "eval.every=100", "eval.personalized_every=100", "fed.num_clients=4",
        "checkpoint.every=0"]


def bench_case(strategy: str, per_round: int, rounds: int) -> tuple[str, list[str]]:
    """(what it is, its overrides)."""
    path = " reduce" if strategy == "fedalign" else ""
    return (f"{strategy}{path}, {per_round} clients a round, {rounds} rounds",
            [f"strategy.name={strategy}", f"fed.clients_per_round={per_round}", f"fed.rounds={rounds}"])


CASES = {"fedavg": bench_case("fedavg", 2, 3), "fedavg4": bench_case("fedavg", 4, 3),
         "fedalign": bench_case("fedalign", 2, 2), "fedalign4": bench_case("fedalign", 4, 3)}
LAYOUTS = {"groups": (4, ["fed.ranks_per_client=2"]), "reference": (2, []), "one_rank": (1, [])}


def final_state(case: list[str], layout: str, out_dir: Path, extra: list[str]) -> torch.Tensor:
    nproc, overrides = LAYOUTS[layout]
    name = f"{'_'.join(o.replace('=', '-') for o in case)}_{layout}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedalign_dist",
            "run",
            "--nproc",
            str(nproc),
            "--config",
            "configs/demo.yaml",
            *TINY,
            *case,
            *extra,
            *overrides,
            f"run.output_dir={out_dir}",
            f"run.name={name}",
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    state = load_file(out_dir / name / "final" / "global.safetensors")
    return torch.cat([state[key].reshape(-1).float() for key in sorted(state)])


def apart(a: torch.Tensor, reference: torch.Tensor) -> str:
    return f"{float((a - reference).norm() / reference.norm()):.3g} ({float((a - reference).abs().max()):.2g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="fedavg,fedavg4,fedalign4", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = parser.parse_args()
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    out_dir = Path(tempfile.mkdtemp(prefix="fedalign_equality_"))
    print(f"configs/demo.yaml {' '.join(TINY + args.overrides)}; relative L2 difference of the final global "
          "state from 2 ranks of 1 (largest element difference)")
    print("| case | 2 groups of 2 ranks | 1 rank hosting every client |")
    print("|---|---|---|")
    for case in args.cases.split(","):
        what, overrides = CASES[case]
        reference = final_state(overrides, "reference", out_dir, args.overrides)
        grouped, alone = (final_state(overrides, layout, out_dir, args.overrides) for layout in ("groups", "one_rank"))
        print(f"| {what} | {apart(grouped, reference)} | {apart(alone, reference)} |", flush=True)


if __name__ == "__main__":
    main()
