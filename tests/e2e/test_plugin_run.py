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

from fedalign_dist.data.sources import load_bbc_news
from tests.conftest import REPO

PLUGINS = REPO / "tests" / "data" / "plugins"


def fedalign_run(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(PLUGINS)]))
    proc = subprocess.run([sys.executable, "-m", "fedalign_dist", "run", "--nproc", "2", "--config",
                           "configs/demo.yaml", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_external_strategy_and_source_on_two_ranks_equal_builtin_fedavg(tmp_path, tiny_overrides):
    bbc = load_bbc_news()
    picked = range(0, len(bbc.texts), 9)  # 248 real articles, every topic
    tsv = tmp_path / "articles.tsv"
    tsv.write_text("".join(f"{bbc.label_names[bbc.labels[i]]}\t{bbc.texts[i]}\n" for i in picked))
    common = tiny_overrides + ["fed.num_clients=4", "fed.clients_per_round=4", "--import", "tsv_source",
                               "data.name=tsv_lines", f"data.tsv_lines.path={tsv}"]
    fedalign_run(common + ["--import", "scaled_fedavg", "run.name=plugin", "strategy.name=scaled_fedavg",
                           "strategy.scaled_fedavg.server_lr=1.0"])
    fedalign_run(common + ["run.name=builtin", "strategy.name=fedavg"])

    plugin, builtin = (load_file(tmp_path / n / "final/global.safetensors") for n in ("plugin", "builtin"))
    assert plugin.keys() == builtin.keys() and all(torch.equal(plugin[n], builtin[n]) for n in plugin)
    records = [json.loads(line) for line in (tmp_path / "plugin/metrics.jsonl").read_text().splitlines()]
    assert [r["server_lr"] for r in records] == [1.0, 1.0] and records[-1]["strategy"] == "scaled_fedavg"
    saved = yaml.safe_load((tmp_path / "plugin/config.yaml").read_text())
    assert saved["imports"] == ["tsv_source", "scaled_fedavg"]
    assert saved["strategy"]["scaled_fedavg"] == {"server_lr": 1.0} and saved["data"]["tsv_lines"] == {"path": str(tsv)}
    data = json.loads((tmp_path / "plugin/data.json").read_text())
    assert data["source"] == "tsv_lines" and data["examples"] == len(picked)
    assert data["label_names"] == sorted(bbc.label_names) and len(data["clients"]) == 4
    assert sum(sum(c.values()) for c in data["clients"]) == len(picked)
