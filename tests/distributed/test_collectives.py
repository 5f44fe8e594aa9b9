"""Real 2-process gloo jobs launched from pytest."""
import pytest

from tests.conftest import torchrun

SCRIPTS = "tests/distributed/scripts"


def test_fedavg_all_reduce_equals_hand_computed_average():
    out = torchrun([f"{SCRIPTS}/fedavg_check.py"], nproc=2)
    assert out.stdout.count("equals the hand-computed average") == 2


def test_deepspeed_engine_per_rank_is_an_independent_client_and_builds_nothing(tmp_path, monkeypatch):
    """ZeRO stages 0, 1 and 2, one after another in one job. The extensions folder holds the
    lock file a job killed while DeepSpeed JIT-compiled its CPU comm op leaves behind; before
    the op was skipped, every later engine waited on it forever."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    out = torchrun([f"{SCRIPTS}/local_trainer_check.py", "0", "1", "2"], nproc=2, timeout=300)
    assert all(out.stdout.count(f"stage {stage} OK") == 2 for stage in (0, 1, 2)), out.stdout[-3000:]
    assert "built successfully" not in out.stdout
    assert sorted(p.name for p in extensions.rglob("*")) == ["deepspeed_shm_comm", "lock"]


def test_one_client_trained_by_a_group_of_two_ranks_equals_it_trained_on_one():
    """ZeRO-3 over a client group (issue 28's engine): half of every parameter per rank, half of
    every batch, the same weights after 3 AdamW steps as one rank on the whole batch."""
    out = torchrun([f"{SCRIPTS}/group_trainer_check.py"], nproc=2, timeout=300)
    assert out.stdout.count("group of 2 OK") == 2, out.stdout[-3000:]


def test_a_bf16_client_group_trains_like_one_bf16_rank_and_keeps_small_updates():
    out = torchrun([f"{SCRIPTS}/group_bf16_check.py"], nproc=2, timeout=300)
    assert out.stdout.count("bf16 group of 2 OK") == 2, out.stdout[-3000:]


def test_a_client_group_runner_holds_its_shard_of_the_global_state_only(tmp_path):
    out = torchrun([f"{SCRIPTS}/group_runner_check.py", str(tmp_path)], nproc=2, timeout=300)
    assert out.stdout.count("runner OK") == 2, out.stdout[-3000:]


@pytest.mark.parametrize("nproc, group", [(2, 1), (4, 2)])
def test_personal_state_follows_its_client_to_another_rank_or_client_group(nproc, group):
    out = torchrun([f"{SCRIPTS}/state_moves_check.py", str(group)], nproc=nproc)
    for kind in ("memory", "disk"):
        assert out.stdout.count(f"{kind} states followed their clients") == nproc, out.stdout[-3000:]


def test_ranks_fail_together_share_tensors_and_apply_rank0s_plan():
    out = torchrun([f"{SCRIPTS}/agreement_check.py"], nproc=2)
    for step in ("failure shared", "rows gathered", "difference detected", "rank 0's plan applied"):
        assert out.stdout.count(step) == 2, out.stdout[-3000:]


def test_bf16_updates_below_one_bf16_step_survive():
    out = torchrun([f"{SCRIPTS}/bf16_master_check.py", "0", "2"], nproc=1)
    for stage in (0, 2):
        assert f"stage {stage}: " in out.stdout, out.stdout[-3000:]
    assert out.stdout.count("round-trips exactly") == 2
