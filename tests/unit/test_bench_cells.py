"""How a benchmark cell's exit is judged: summary.json (the run's last output) decides."""
import pytest

from fedalign_dist.benchmark.cells import BenchmarkFailed, cell_outcome


def test_a_clean_exit_is_silent(tmp_path):
    assert cell_outcome(tmp_path, 0, "all good") is None


def test_a_crash_before_the_end_fails_the_cell_with_its_output(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # rounds ran, but no summary: not finished
    with pytest.raises(BenchmarkFailed, match=r"failed \(1\):\nTraceback: boom"):
        cell_outcome(tmp_path, 1, "Traceback: boom")


def test_a_teardown_crash_after_the_outputs_keeps_the_cell_and_says_so(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    warning = cell_outcome(tmp_path, -6, "terminate called without an active exception")
    assert warning.startswith("warning:") and "(-6)" in warning and "kept" in warning
    assert warning.endswith("terminate called without an active exception")
