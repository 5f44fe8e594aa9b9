"""`fedalign-dist diagnose` end to end, in this process (one rank): a config's clients trained
one round and compared; a finished run's recorded routing; refusals in one line."""
import json

import pytest

from fedalign_dist import cli
from tests.conftest import TINY


def _diagnose(args, capfd, code=0):
    capfd.readouterr()
    with pytest.raises(SystemExit) as done:
        cli.main(["diagnose", *args])
    out, err = capfd.readouterr()
    assert done.value.code == code, (done.value.code, err[-3000:])
    return out, err


def test_diagnose_a_config_prints_a_table_and_a_verdict_and_writes_json(tmp_path, capfd, one_thread):
    out_json = tmp_path / "premise.json"
    out, _ = _diagnose(["--config", "configs/demo.yaml", "--clients", "3", "--out", str(out_json), *TINY,
                        f"run.output_dir={tmp_path}", "fed.num_clients=4", "strategy.name=fedavg"], capfd)
    result = json.loads(out_json.read_text())
    assert len(result["clients"]) == 3 and [r["layer"] for r in result["layers"]] == [0, 1]
    for row in result["layers"]:
        assert 0 <= row["role_agreement"] <= 1 and row["pairs"] == 3
        assert row["matched_similarity"] >= row["same_number_similarity"] - 1e-12
    assert "| layer | routing JS mean |" in out and result["verdict"] in out
    assert result["verdict"].split(";")[0].split()[0] in ("experts", *(f"{p}%" for p in range(101)))
    assert not list(tmp_path.glob("diagnose*")), "the scratch run folder is not kept"


def test_diagnose_reads_a_finished_runs_routing_or_says_what_is_missing(batch, tmp_path, capfd):
    run = batch.run_dir("fedalign_reduce")
    out, _ = _diagnose(["--run", str(run), "--out", str(tmp_path / "d.json")], capfd)
    result = json.loads((tmp_path / "d.json").read_text())
    assert result["source"].endswith("round 1") and len(result["clients"]) == 4
    assert result["verdict"].startswith("Gating preferences") and "runs record no expert signatures" in out
    _, err = _diagnose(["--run", str(batch.run_dir("guard_fedavg"))], capfd, code=2)
    assert "records no per-client routing statistics (strategy fedavg" in err and "diagnose --config" in err


def test_diagnose_refuses_a_dense_model_and_too_few_clients(tmp_path, capfd):
    _, err = _diagnose(["--config", "configs/fedamole.yaml"], capfd, code=2)
    assert "dense Llama model without a router" in err and len(err.strip().splitlines()) == 1
    _, err = _diagnose(["--config", "configs/demo.yaml", "--clients", "1"], capfd, code=2)
    assert "--clients must be at least 2" in err
    _, err = _diagnose(["--run", str(tmp_path)], capfd, code=2)
    assert "not a run folder (no metrics.jsonl)" in err
