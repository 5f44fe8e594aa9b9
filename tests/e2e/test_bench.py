"""The benchmark commands end to end: a tiny grid (tuning on validation data, final runs on test
data, results folder, resuming) and failures; marked slow (`make test-slow`), the --quick forms
of the real grids and of the systems suite. Every real grid's cells are validated by the fast
suite too (tests/unit/test_bench_summary.py)."""
import json
import subprocess
import sys

import pytest
import yaml

from fedalign_dist.benchmark.grid import load_grid
from tests.conftest import REPO


def _bench(out):
    return subprocess.run([sys.executable, "-m", "fedalign_dist", "bench", "--grid", "tests/data/bench_tiny.yaml",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow  # seven one-rank cells through `fedalign-dist run`, twice (~80 s)
def test_bench_grid_tunes_runs_reports_and_resumes(tmp_path):
    out = tmp_path / "results"
    first = _bench(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("tune ") == 4 and first.stdout.count("final ") == 2
    tune_cfg = (out / "tune/bbc/fedavg/cand0/config.yaml").read_text()
    assert "split: val" in tune_cfg
    assert "split: test" in (out / "runs/bbc/fedavg/seed0/config.yaml").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results["chosen"]["bbc"]) == {"fedavg", "fedalign"}
    # the grid's tune_by picks by validation perplexity, the lower the better
    lrs = load_grid(REPO / "tests/data/bench_tiny.yaml").tune["local.lr"]
    for method in ("fedavg", "fedalign"):
        ppl = [json.loads((out / f"tune/bbc/{method}/cand{i}/summary.json").read_text())["final_global_perplexity"]
               for i in range(2)]
        assert results["chosen"]["bbc"][method] == [f"local.lr={lrs[ppl.index(min(ppl))]}"], (method, ppl)
    table = (out / "results.md").read_text()
    assert "| fedavg |" in table and "| fedalign |" in table and "±" in table
    assert "global perplexity" in table and "bbc: by perplexity" in table
    assert (out / "convergence_bbc_perplexity.png").stat().st_size > 0
    assert (out / "convergence_bbc.png").stat().st_size > 0

    # a half-finished grid: one final run lost its summary; only that cell runs again
    summary = out / "runs/bbc/fedalign/seed0/summary.json"
    summary.unlink()
    kept = (out / "runs/bbc/fedavg/seed0/summary.json").stat().st_mtime_ns
    second = _bench(out)
    assert second.returncode == 0, second.stdout[-3000:]
    assert summary.is_file() and (out / "runs/bbc/fedavg/seed0/summary.json").stat().st_mtime_ns == kept


def test_a_failed_cell_does_not_stop_the_others(tmp_path):
    from fedalign_dist.benchmark.cells import BenchmarkFailed
    from fedalign_dist.benchmark.grid import GridSpec, _run_cells
    spec = GridSpec(base="configs/demo.yaml", seeds=[0], scenarios={}, methods={}, nproc=1, parallel=2)
    tiny = ["fed.rounds=1", "local.steps=1", "local.batch_size=4", "data.max_examples=200",
            "data.min_client_examples=5", "fed.num_clients=2", "fed.clients_per_round=2", "eval.batch_size=64"]
    cells = [("bad", tmp_path / "bad", tiny + ["fed.rouds=1"]), ("good", tmp_path / "good", tiny)]
    with pytest.raises(BenchmarkFailed, match=r"1 benchmark cell\(s\) failed[\s\S]*did you mean 'fed.rounds'"):
        _run_cells(spec, cells, log=lambda _: None)
    assert (tmp_path / "good/summary.json").is_file()


@pytest.mark.slow  # the real grids' --quick forms: 1-4.5 minutes each (make test-slow)
def test_quick_quality_grid_covers_every_scenario_and_method(tmp_path):
    """The real benchmark grid (configs/bench/quality.yaml) in its --quick form, so it never
    rots: every cell's config is validated (load_grid; every cell of every real grid also in
    the fast suite), each strategy runs on the first scenario (the FedAlign-MoE variants differ
    from `fedalign` only in values, not in code), and FedAvg with one variant on the scenarios
    whose data or task differ (--scenarios/--methods narrow the grid)."""
    out = tmp_path / "quick"
    spec = load_grid(REPO / "configs/bench/quality.yaml")
    first = next(iter(spec.scenarios))
    strategies = ["local", "fedavg", "fedprox", "fedmoe", "fedalign", "fedamole"]
    assert set(strategies) <= set(spec.methods)
    others = ["outlets", "headlines"]  # natural partition; instruction task scored by ROUGE-L
    for only in (["--scenarios", first, "--methods", ",".join(strategies)],
                 ["--scenarios", ",".join(others), "--methods", "fedavg,fedalign_beta_inf"]):
        done = subprocess.run([sys.executable, "-m", "fedalign_dist", "bench", "--grid", "configs/bench/quality.yaml",
                               "--out", str(out), "--quick", *only], cwd=REPO, capture_output=True, text=True,
                              timeout=1800)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        table = (out / "results.md").read_text()
        if only[1] == first:
            assert f"## {first}" in table and (out / f"convergence_{first}.png").stat().st_size > 0
            assert all(f"| {method} |" in table for method in strategies)
            assert "rounds to fedavg's final" in table
    for scenario in others:
        assert f"## {scenario}" in table and (out / f"convergence_{scenario}.png").stat().st_size > 0
    assert "| fedalign_beta_inf |" in table and "| local |" not in table and "rounds to fedavg's final" in table
    beta_inf = yaml.safe_load((out / "runs/outlets/fedalign_beta_inf/seed0/config.yaml").read_text())
    assert beta_inf["strategy"]["fedalign"]["beta"] == float("inf") and beta_inf["eval"]["split"] == "test"
    amole = yaml.safe_load((out / f"runs/{first}/fedamole/seed0/config.yaml").read_text())
    assert amole["strategy"]["name"] == "fedamole" and amole["data"]["partition"] == "dirichlet"


@pytest.mark.slow  # the real grids' --quick forms: 1-4.5 minutes each (make test-slow)
def test_quick_pretrained_grid_runs_every_kind_of_cell(tmp_path):
    """configs/bench/pretrained.yaml (issue 16's benchmark on the pretrained bases) in its
    --quick form: every cell's config is validated; one cell of each kind runs (full
    fine-tuning of the MoE base, per-expert LoRA, the robust FedAlign variant, FedAMoLE on
    the dense base)."""
    spec = load_grid(REPO / "configs/bench/pretrained.yaml")
    assert {"fedavg", "fedalign", "fedalign_as_specified", "fedamole", "fedalign_lora"} <= set(spec.methods)
    out = tmp_path / "quick"
    done = subprocess.run([sys.executable, "-m", "fedalign_dist", "bench", "--grid", "configs/bench/pretrained.yaml",
                           "--out", str(out), "--quick", "--scenarios", "bbc_dir0.1", "--methods",
                           "fedavg,fedalign_robust,fedalign_lora,fedamole"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in ("fedavg", "fedalign_robust", "fedalign_lora", "fedamole"))
    runs = out / "runs/bbc_dir0.1"
    model = {m: json.loads((runs / m / "seed0/model.json").read_text()) for m in ("fedalign_lora", "fedamole")}
    assert model["fedalign_lora"]["source"] == "package:public-moe-8x2" and model["fedalign_lora"]["num_experts"] == 8
    assert model["fedamole"]["source"] == "package:public-dense"
    robust = yaml.safe_load((runs / "fedalign_robust/seed0/config.yaml").read_text())["strategy"]["fedalign"]
    assert robust["center_signatures"] is True and robust["centroid_weights"] == "uniform"


@pytest.mark.slow  # the real grids' --quick forms: 1-4.5 minutes each (make test-slow)
def test_quick_systems_suite_writes_tables_and_plots(tmp_path):
    out = tmp_path / "systems"
    done = subprocess.run([sys.executable, "-m", "fedalign_dist", "bench", "--systems", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "systems.json").read_text())
    split = results["time_split"]
    assert set(split) == {"fedavg", "fedalign (reduce)"}  # the quick form's two (all six in the full suite)
    # FedAvg has no statistics pass (its timer brackets nothing); FedAlign-MoE's is real work
    assert split["fedavg"]["stats"] < 0.1 * split["fedalign (reduce)"]["stats"]
    assert all(row["comm"] > 0 for row in split.values())
    # reduce sends about one model per rank whatever the clients; allgather grows with them
    first, last = results["comm"][0], results["comm"][-1]
    assert last["reduce"] < 1.1 * first["reduce"] and last["allgather"] > 2 * first["allgather"]
    assert [row["clients"] for row in results["scale"]] == [16, 2000]
    assert "s/round ratio" in (out / "systems.md").read_text()
    assert all(len(row["peak_rss_mb_per_rank"]) == 2 for row in results["scale"])
    [overhead] = results["overhead"]  # one alternated pair in the quick form
    assert (
        overhead["floor_s"] > 0
        and overhead["framework_s"] > 0
        and "plain-torch floor" in (out / "systems.md").read_text()
    )
    for png in ("time_split.png", "bytes_vs_clients.png", "scale.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.slow  # the real grids' --quick forms: 1-4.5 minutes each (make test-slow)
def test_quick_privacy_sweep_writes_the_epsilon_accuracy_table_and_plot(tmp_path):
    """configs/bench/privacy.yaml (issue 17's sweep) in --quick form, then bench/privacy_sweep.py:
    every cell's config is validated, the noise seed follows the cell's seed, and the table
    carries each method's epsilon (none without DP, the accountant's with it)."""
    spec = load_grid(REPO / "configs/bench/privacy.yaml")
    assert {"fedavg", "fedalign", "fedavg_clip", "fedalign_z1e-4"} <= set(spec.methods)
    out = tmp_path / "quick"
    done = subprocess.run([sys.executable, "-m", "fedalign_dist", "bench", "--grid", "configs/bench/privacy.yaml",
                           "--out", str(out), "--quick", "--methods", "fedavg,fedavg_z1e-2,fedalign_z1e-2"], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = yaml.safe_load((out / "runs/bbc_dir1.0/fedalign_z1e-2/seed0/config.yaml").read_text())
    assert cfg["privacy"]["noise_seed"] == 0 and cfg["privacy"]["statistics_noise_multiplier"] == 0.01
    sweep = subprocess.run([sys.executable, "bench/privacy_sweep.py", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    table = (out / "privacy_sweep.md").read_text()
    from fedalign_dist.privacy.accountant import epsilon, round_mechanism
    eps = epsilon(round_mechanism(10, 5, 0.01), 2, 1e-5)
    assert "| fedavg | no DP | - |" in table and f"| fedavg_z1e-2 | z1e-2 | {eps:.3g} |" in table
    assert (out / "privacy_sweep.png").stat().st_size > 1000
