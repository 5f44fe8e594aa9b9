"""Systems benchmark: the time split arithmetic, the tables and the plots it writes."""
import pytest

from fedalign_dist.benchmark.systems import SPLIT_KEYS, time_split, write_systems
from fedalign_dist.plots import plot_lines, plot_stacked_bars


def test_time_split_carves_communication_out_of_aggregation():
    records = [{"time_local_s": 2.0, "time_stats_s": 0.2, "time_sync_s": 0.5, "time_aggregate_s": 0.4,
                "time_comm_s": 0.3, "time_eval_s": 1.0, "time_round_s": 4.1},
               {"time_local_s": 4.0, "time_stats_s": 0.4, "time_sync_s": 0.1, "time_aggregate_s": 0.6,
                "time_comm_s": 0.1, "time_eval_s": 1.0, "time_round_s": 6.1}]
    split = time_split(records)
    assert split == pytest.approx({"local": 3.0, "stats": 0.3, "wait": 0.3, "comm": 0.2, "aggregation": 0.3,
                                   "eval": 1.0, "round": 5.1})
    # a one-rank run (no collectives) and an older record without the key: no communication
    assert time_split([{"time_aggregate_s": 0.1, "time_round_s": 1.0}])["comm"] == 0.0


def test_write_systems_tables_and_plots(tmp_path):
    results = {
        "time_split": {"fedavg": {**dict.fromkeys(SPLIT_KEYS, 0.5), "round": 3.0},
                       "fedalign (allgather)": {**dict.fromkeys(SPLIT_KEYS, 1.0), "round": 6.0}},
        "comm": [{"clients_per_rank": 2, "reduce": 1_000_000, "allgather": 3_000_000},
                 {"clients_per_rank": 8, "reduce": 1_100_000, "allgather": 8_800_000}],
        "scale": [{"clients": 16, "s_per_round": 9.5, "peak_rss_mb_per_rank": [2300.0, 2310.0]},
                  {"clients": 1000, "s_per_round": 9.6, "peak_rss_mb_per_rank": [2400.0, 2420.0]}],
        "overhead": [{"floor_s": 0.8, "framework_s": 0.84, "wait_s": 0.004, "ratio": 1.05}]}
    write_systems(tmp_path, results)
    text = (tmp_path / "systems.md").read_text()
    assert "| fedalign (allgather) | 1.000 |" in text
    assert "| 8 | 1,100,000 | 8,800,000 | 8.00 |" in text
    assert "| 1,000 | 9.60 | 2400, 2420 |" in text
    assert "| 0 | 0.800 | 0.840 | 0.004 | 1.05 |" in text
    for png in ("time_split.png", "bytes_vs_clients.png", "scale.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_overhead_rows_leave_out_first_rounds_and_the_evaluating_last(tmp_path):
    import json

    from fedalign_dist.benchmark.systems import overhead_rows
    (tmp_path / "overhead" / "framework_0").mkdir(parents=True)
    (tmp_path / "overhead" / "floor_0.json").write_text(json.dumps({"seconds_per_round": [9.0, 1.0, 2.0, 3.0]}))
    rounds = [(9.0, 0.5), (2.2, 0.1), (2.0, 0.0), (2.4, 0.2), (7.0, 0.0)]
    (tmp_path / "overhead" / "framework_0" / "metrics.jsonl").write_text("".join(
        json.dumps({"time_round_s": s, "time_sync_s": w}) + "\n" for s, w in rounds))
    assert overhead_rows(tmp_path, 1) == [pytest.approx({"floor_s": 2.0, "framework_s": 2.2, "wait_s": 0.1,
                                                         "ratio": 1.1})]


def test_plot_helpers_write_pngs(tmp_path):
    plot_stacked_bars({"a": [1.0, 2.0], "b": [0.5, 0.0]}, ("x", "y"), tmp_path / "bars.png", "s")
    plot_lines([1, 10, 100], {"line": [1.0, 2.0, 4.0]}, tmp_path / "lines.png", "n", "v", logy=True,
               right={"rss": [10.0, 10.0, 11.0]})
    assert (tmp_path / "bars.png").stat().st_size > 1000 and (tmp_path / "lines.png").stat().st_size > 1000


def test_markdown_table():
    from fedalign_dist.markdown import table
    assert table(["a", "b"], [[1, "x"], [2.5, None]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | None |"]


def test_bench_help_names_the_client_counts_the_suite_runs():
    import subprocess
    import sys

    from fedalign_dist.benchmark.systems import plan
    from tests.conftest import REPO
    shown = " ".join(subprocess.run([sys.executable, "-m", "fedalign_dist", "bench", "--help"], cwd=REPO,
                                    capture_output=True, text=True, timeout=120, check=True).stdout.split())
    assert max(plan(False).scale_clients) == 100_000 and max(plan(True).scale_clients) == 2000
    assert "up to 100,000 clients (2,000 with --quick)" in shown and "1000 clients" not in shown
