"""Users' data end to end: the README's "Your own data" example run verbatim (its CSV, its
command, the data.json it shows), and the shipped instruction scenario (configs/headlines.yaml)
on 2 ranks (the shared job), whose loss and perplexity fall and whose ROUGE-L is reported (metrics, summary, report)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def readme_section_blocks(title: str) -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(title):]
    section = section[:section.index("\n## ")]
    return {lang: re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1) for lang in ("python", "bash", "json")}


@pytest.mark.slow  # the README's command verbatim: 5 rounds of 20 steps on 2 ranks (~40 s)
def test_readme_own_data_example_runs_verbatim(tmp_path):
    blocks = readme_section_blocks("### Your own data")
    (tmp_path / "make_notes.py").write_text(blocks["python"])
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs/demo.yaml", tmp_path / "configs/demo.yaml")
    bin_dir = tmp_path / "bin"  # `fedalign-dist` of this checkout, whatever is installed
    bin_dir.mkdir()
    (bin_dir / "fedalign-dist").write_text(f"#!/bin/sh\nexec {sys.executable} -m fedalign_dist \"$@\"\n")
    (bin_dir / "fedalign-dist").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", "-e", "-c", blocks["bash"]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "runs/clinics/data.json").read_text()) == json.loads(blocks["json"])
    records = [json.loads(line) for line in (tmp_path / "runs/clinics/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5 and records[-1]["train_loss"] < records[0]["train_loss"]


def test_headline_instruction_scenario_on_two_ranks_learns(batch):
    run = batch.run_dir("headlines")  # configs/headlines.yaml, 3 rounds of 8 steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["global_perplexity"] < records[0]["global_perplexity"]
    assert all(0.0 <= r["global_rougeL"] <= 1.0 and 0.0 <= r["personalized_rougeL"] <= 1.0 for r in records)
    assert json.loads((run / "data.json").read_text())["task"] == "instruction"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_global_rougeL"] == records[-1]["global_rougeL"]
    from fedalign_dist.report import write_report
    report = write_report(run).read_text()
    assert "final global rougeL" in report and (run / "report/rougeL.png").stat().st_size > 0
