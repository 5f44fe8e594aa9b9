"""The Python API: a run inside this (pytest) process equals the command line's run of the
same config, and two runs in one process do not interfere (one engine each, same results,
no launcher variables left behind); evaluation cadences skip evaluations, nothing else."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import fedalign_dist as fd
from tests.conftest import REPO, TINY, torchrun

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_api_runs_equal_the_cli_and_do_not_interfere(tmp_path, tiny_overrides, one_thread):
    overrides = tiny_overrides + ["fed.num_clients=4", "fed.clients_per_round=4", "strategy.name=fedavg"]
    cfg = fd.load_config("configs/demo.yaml", overrides)
    before = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}
    first = fd.run(cfg, "run.name=api_a")
    second = fd.run(cfg, "run.name=api_b")
    assert {k: os.environ.get(k) for k in LAUNCHER_VARIABLES} == before
    assert [r["round"] for r in first] == [0, 1]
    keys = ("train_loss", "global_accuracy", "personalized_accuracy", "global_perplexity")
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]
    for name in ("api_a", "api_b"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["engine_inits_per_rank"] == [1]
    # evaluation cadences: skipping an evaluation leaves training exactly as it was
    sparse = fd.run(cfg, "run.name=api_c", "fed.rounds=3", "eval.every=2", "eval.personalized_every=2")
    assert [(r["global_accuracy"] is None, r["personalized_accuracy"] is None) for r in sparse] == [
        (True, True), (False, False), (False, False)]  # round 1 by the cadence, round 2 as the last
    assert [r["train_loss"] for r in sparse[:2]] == [r["train_loss"] for r in first]
    assert sparse[1]["personalized_accuracy"] == first[1]["personalized_accuracy"]
    torchrun(["-m", "fedalign_dist", "train", "--config", "configs/demo.yaml", *overrides, "run.name=cli"], nproc=1)
    api, cli = (load_file(tmp_path / n / "final/global.safetensors") for n in ("api_a", "cli"))
    assert api.keys() == cli.keys() and all(torch.equal(api[n], cli[n]) for n in api)


def test_a_preset_run_prints_no_deprecation_warning_of_transformers(tmp_path):
    # in a process of its own: transformers warns once per process
    run = "import sys, fedalign_dist as fd; fd.run('configs/demo.yaml', *sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", run, *TINY, "fed.rounds=1", f"run.output_dir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "is deprecated" not in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
