"""A strategy from outside the package in a real 2-rank run, started the way a user would:
`fedalign-dist run --nproc 2 --import scaled_fedavg`. With server_lr=1 it must equal the
built-in FedAvg bit for bit; the run folder records the import so the run can resume."""
import json
import os
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, torchrun

PLUGINS = REPO / "tests" / "data" / "plugins"
TRAIN = ["-m", "fedalign_dist", "train", "--config", "configs/demo.yaml"]


def test_external_strategy_on_two_ranks_equals_builtin_fedavg(tmp_path, tiny_overrides):
    common = tiny_overrides + ["fed.num_clients=4", "fed.clients_per_round=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(PLUGINS)]))
    proc = subprocess.run([sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config",
                           "configs/demo.yaml", "--import", "scaled_fedavg", *common, "run.name=plugin",
                           "strategy.name=scaled_fedavg", "strategy.scaled_fedavg.server_lr=1.0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    torchrun(TRAIN + common + ["run.name=builtin", "strategy.name=fedavg"], nproc=2)
    plugin, builtin = (load_file(tmp_path / n / "final/global.safetensors") for n in ("plugin", "builtin"))
    assert plugin.keys() == builtin.keys() and all(torch.equal(plugin[n], builtin[n]) for n in plugin)
    records = [json.loads(line) for line in (tmp_path / "plugin/metrics.jsonl").read_text().splitlines()]
    assert [r["server_lr"] for r in records] == [1.0, 1.0] and records[-1]["strategy"] == "scaled_fedavg"
    saved = yaml.safe_load((tmp_path / "plugin/config.yaml").read_text())
    assert saved["imports"] == ["scaled_fedavg"] and saved["strategy"]["scaled_fedavg"] == {"server_lr": 1.0}
