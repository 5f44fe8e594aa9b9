"""How `fedalign-dist run` names the cause of a failed run (the launcher's pure part; the
real launches are in tests/e2e/test_failures.py)."""
import sys

from fedalign_dist.distributed.local_launch import RankExit, failure_report, rank_env

TRACE = {"message": "RuntimeError: boom", "extraInfo": {"py_callstack": "Traceback ...\nRuntimeError: boom\n"}}
PEER = {"message": "RuntimeError: Connection closed by peer",
        "extraInfo": {"py_callstack": "Traceback ...\nRuntimeError: Connection closed by peer\n"}}


def test_the_rank_that_recorded_an_error_is_the_cause_even_if_a_peer_exited_first():
    report = failure_report([RankExit(0, 1, None, float("inf")), RankExit(1, 1, TRACE, 100.0)], first_failed=0)
    assert report.splitlines()[0] == "fedalign-dist: the run failed: rank 1 exited with code 1"
    assert "rank 1's traceback:\nTraceback ...\nRuntimeError: boom" in report
    assert report.endswith("(rank 0 stopped with it)")


def test_a_rank_killed_from_outside_is_the_cause_not_the_peer_that_lost_its_connection():
    report = failure_report([RankExit(0, 1, PEER, 100.0), RankExit(1, -9, None, float("inf"))], first_failed=0)
    assert report.splitlines()[0] == "fedalign-dist: the run failed: rank 1 exited with code -9 (killed by SIGKILL)"
    assert "Connection closed" not in report


def test_ranks_the_launcher_stopped_are_not_the_cause():
    report = failure_report([RankExit(0, 2, None, float("inf")), RankExit(1, -15, None, float("inf"), True)],
                            first_failed=0)
    assert report.splitlines()[0] == "fedalign-dist: the run failed: rank 0 exited with code 2"
    assert report.endswith("(rank 1 stopped with it)")


def test_rank_environment_is_what_torchrun_sets_for_one_node(tmp_path):
    env = rank_env(1, 4, 29500, tmp_path)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} \
        == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}
    assert env["TORCHELASTIC_ERROR_FILE"] == str(tmp_path / "rank_1.json")


def test_the_launcher_imports_no_torch():
    import subprocess
    code = ("import sys; from fedalign_dist.cli import cmd_run; from fedalign_dist.distributed.local_launch import "
            "launch_local, interrupted_report; import fedalign_dist.checkpoint; "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_a_rank_on_packaged_data_imports_neither_datasets_nor_pandas():
    """A rank building its federated data from a packaged set (no user files) and every
    strategy: datasets' pyarrow and pandas would cost each rank ~90 MB."""
    import subprocess
    code = ("import sys; from fedalign_dist.train import quiet_libraries, train; quiet_libraries(); "
            "import fedalign_dist.strategies, fedalign_dist.runner; "
            "from fedalign_dist.config import load_config; from fedalign_dist.data.tokenizer import ByteTokenizer; "
            "from fedalign_dist.data.federated import build_federated_data; "
            "cfg = load_config(None, ['data.max_examples=200', 'data.min_client_examples=5']); "
            "data = build_federated_data(cfg.data, 4, 0, ByteTokenizer()); assert len(data.examples) == 200; "
            "print(sorted(m for m in ('datasets', 'pandas', 'pyarrow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
