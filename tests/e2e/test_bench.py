"""The benchmark command end to end on a tiny grid: tuning on validation data, final runs on
test data, results.md / results.json / PNG, and resuming a finished or half-finished grid."""
import json
import subprocess
import sys

from tests.conftest import REPO


def _bench(out):
    return subprocess.run([sys.executable, "-m", "fedalign_dist", "bench", "--grid", "tests/data/bench_tiny.yaml",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)


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
    table = (out / "results.md").read_text()
    assert "| fedavg |" in table and "| fedalign |" in table and "±" in table
    assert (out / "convergence_bbc.png").stat().st_size > 0

    # a half-finished grid: one final run lost its summary; only that cell runs again
    summary = out / "runs/bbc/fedalign/seed0/summary.json"
    summary.unlink()
    kept = (out / "runs/bbc/fedavg/seed0/summary.json").stat().st_mtime_ns
    second = _bench(out)
    assert second.returncode == 0, second.stdout[-3000:]
    assert summary.is_file() and (out / "runs/bbc/fedavg/seed0/summary.json").stat().st_mtime_ns == kept
