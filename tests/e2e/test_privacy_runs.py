"""Client-level DP in real runs: with the noise off and clipping that never bites, a DP run is
the plain run bit for bit; with noise, the aggregate gets one draw whatever the number of
ranks; epsilon in the metrics is the accountant's, and a run stops at its target epsilon.
Runs of one rank train in this process; the 2-rank run is the shared job's."""
import json

import pytest
import torch
from safetensors.torch import load_file

import fedalign_dist as fd
from fedalign_dist.config import load_config
from fedalign_dist.privacy.accountant import epsilon, round_mechanism
from fedalign_dist.report import write_report
from tests.e2e.shared_runs import DP_FEDALIGN, dp_target_epsilon

EQUAL = ["fed.num_clients=6", "fed.clients_per_round=4"]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(overrides):
    return fd.run(fd.load_config("configs/demo.yaml", overrides))


def test_noise_off_and_unbitten_clipping_is_the_plain_run_bitwise(tmp_path, tiny_overrides):
    # DP weighs every client as one (example counts are private): the plain run does the same
    _run(tiny_overrides + EQUAL + ["strategy.name=fedavg", "run.name=plain", "fed.weighting=uniform"])
    _run(tiny_overrides + EQUAL + ["strategy.name=fedavg", "run.name=dp", "privacy.enabled=true",
                                   "privacy.noise_multiplier=0", "privacy.clip_norm=1e9", "privacy.noise_seed=0",
                                   "privacy.delta=1e-3"])
    a, b = load_file(tmp_path / "plain/final/global.safetensors"), load_file(tmp_path / "dp/final/global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    plain_r, dp_r = _records(tmp_path / "plain"), _records(tmp_path / "dp")
    assert [r["clients_per_rank"] for r in plain_r] == [r["clients_per_rank"] for r in dp_r]
    assert all(r["dp_epsilon"] is None and r["dp_clip_norm"] == 1e9 for r in dp_r)  # no noise: no guarantee
    assert "dp_epsilon" not in plain_r[0]


def test_dp_fedalign_run_reports_epsilon_and_stops_at_its_target(tmp_path, tiny_overrides, batch, capfd, one_thread):
    """DP_FEDALIGN with a target epsilon that allows 2 of its 3 rounds: on 2 ranks (the shared
    job) and on 1 (this process)."""
    target = dp_target_epsilon()
    cfg = load_config("configs/demo.yaml", tiny_overrides + DP_FEDALIGN)
    mech = round_mechanism(8, 4, 1.5, 2.0, max(4 / 20, 2 * 1.5))  # the default count noise
    capfd.readouterr()
    _run(tiny_overrides + DP_FEDALIGN + ["run.name=dp1", f"privacy.target_epsilon={target}"])
    outputs = {1: "".join(capfd.readouterr()), 2: batch.log("dp_fedalign")}
    runs = {1: tmp_path / "dp1", 2: batch.run_dir("dp_fedalign")}
    finals = {}
    for nproc, run in runs.items():
        records = _records(run)
        assert [r["round"] for r in records] == [0, 1]
        for r in records:
            assert r["dp_epsilon"] == pytest.approx(epsilon(mech, r["round"] + 1, 1e-3), rel=1e-9)
            assert r["dp_delta"] == 1e-3 and r["dp_noise_std_max"] > 0
            assert "experts_moved" in r  # matching on the noised statistics
        assert records[0]["dp_clip_norm"] == cfg.privacy.clip_norm != records[1]["dp_clip_norm"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["privacy"]["stopped_at_target_epsilon"]
        assert summary["privacy"]["epsilon"] == pytest.approx(records[-1]["dp_epsilon"])
        assert summary["privacy"]["covers"] == "model updates and shared statistics"
        assert "eps " in outputs[nproc] and "target_epsilon" in outputs[nproc]
        assert f"| epsilon (delta) after the last round | {records[-1]['dp_epsilon']:.4g} (0.001) |" in \
            write_report(run).read_text()
        finals[nproc] = load_file(run / "final/global.safetensors")
    # the same sample and ONE noise draw on one rank and on two: equal up to float summation order
    for name, t in finals[2].items():
        torch.testing.assert_close(t, finals[1][name], rtol=1e-4, atol=1e-5)


def test_a_resumed_dp_run_keeps_its_secret_and_clip_bound(tmp_path, tiny_overrides):
    """The secret (drawn at the start, not configured) and the adaptive C live in the
    checkpoint: resuming continues with them, exactly as a run that knew the secret from the start."""
    dp = tiny_overrides + [
        "strategy.name=fedavg",
        "fed.num_clients=6",
        "fed.clients_per_round=3",
        "privacy.enabled=true",
        "privacy.delta=1e-3",
        "privacy.adaptive_clip=true",
        "checkpoint.every=1",
    ]
    _run(dp + ["run.name=resumed", "fed.rounds=2"])
    saved = json.loads((tmp_path / "resumed/checkpoints/round_00001/strategy.json").read_text())
    secret = int(saved["privacy.secret"])
    _run(dp + ["run.name=resumed", "fed.rounds=3", "run.resume=true"])
    _run(dp + ["run.name=clean", "fed.rounds=3", f"privacy.noise_seed={secret}"])
    a, b = (
        load_file(tmp_path / "resumed/final/global.safetensors"),
        load_file(tmp_path / "clean/final/global.safetensors"),
    )
    assert all(torch.equal(a[n], b[n]) for n in a)
    resumed, clean = _records(tmp_path / "resumed"), _records(tmp_path / "clean")
    assert [r["dp_clip_norm"] for r in resumed] == [r["dp_clip_norm"] for r in clean]
    assert [r["clients_per_rank"] for r in resumed] == [r["clients_per_rank"] for r in clean]


def test_a_diverged_client_counts_as_a_zero_update_under_dp(tmp_path, tiny_overrides, capfd, monkeypatch):
    """Leaving a diverged client out would change the other clients' weights by its data, so
    under DP it stays in the round with a zero update (and bounded statistics)."""
    monkeypatch.setenv("FEDALIGN_DIST_FAULT", "diverge_client=2")
    _run(tiny_overrides + ["run.name=r", "strategy.name=fedalign", "fed.num_clients=4", "fed.clients_per_round=4",
                           "privacy.enabled=true", "privacy.delta=1e-3", "privacy.noise_seed=1"])
    out = capfd.readouterr().out
    assert "client 2: non-finite" in out and "counts as a zero update" in out
    for r in _records(tmp_path / "r"):
        assert r["num_rejected"] == 0 and r["num_clients_trained"] == 4
    final = load_file(tmp_path / "r/final/global.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
