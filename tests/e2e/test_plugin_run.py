"""A strategy and a data source from outside the package in a real 2-rank run, started the
way a user would: `fedalign-dist run --nproc 2 --import scaled_fedavg --import tsv_source`.
With server_lr=1 the external strategy must equal the built-in FedAvg bit for bit on the same
external data; the run folder records the imports (so the run can resume) and the data that
the external source gave."""
import json
import os
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO

PLUGINS = REPO / "tests" / "data" / "plugins"


def fedalign_run(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(PLUGINS)]))
    proc = subprocess.run([sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config",
                           "configs/demo.yaml", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_external_strategy_and_source_on_two_ranks_equal_builtin_fedavg(tmp_path, tiny_overrides, batch):
    tsv = batch.inputs / "articles.tsv"  # 248 real BBC articles (tests/e2e/shared_runs.py)
    fedalign_run(tiny_overrides + ["fed.num_clients=4", "fed.clients_per_round=4", "--import", "tsv_source",
                                   "data.name=tsv_lines", f"data.tsv_lines.path={tsv}", "--import", "scaled_fedavg",
                                   "run.name=plugin", "strategy.name=scaled_fedavg",
                                   "strategy.scaled_fedavg.server_lr=1.0"])
    # the built-in FedAvg on the same external data: the shared job's run "plugin_builtin"
    plugin, builtin = (load_file(d / "final/global.safetensors")
                       for d in (tmp_path / "plugin", batch.run_dir("plugin_builtin")))
    assert plugin.keys() == builtin.keys() and all(torch.equal(plugin[n], builtin[n]) for n in plugin)
    records = [json.loads(line) for line in (tmp_path / "plugin/metrics.jsonl").read_text().splitlines()]
    assert [r["server_lr"] for r in records] == [1.0, 1.0] and records[-1]["strategy"] == "scaled_fedavg"
    saved = yaml.safe_load((tmp_path / "plugin/config.yaml").read_text())
    assert saved["imports"] == ["tsv_source", "scaled_fedavg"]
    assert saved["strategy"]["scaled_fedavg"] == {"server_lr": 1.0} and saved["data"]["tsv_lines"] == {"path": str(tsv)}
    data = json.loads((tmp_path / "plugin/data.json").read_text())
    lines = tsv.read_text().splitlines()
    assert data["source"] == "tsv_lines" and data["examples"] == len(lines)
    assert data["label_names"] == sorted({line.split("\t")[0] for line in lines}) and len(data["label_names"]) == 5
    assert len(data["clients"]) == 4
    assert sum(sum(c.values()) for c in data["clients"]) == len(lines)
