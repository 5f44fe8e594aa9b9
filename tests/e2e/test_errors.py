"""Bad input fails fast with a message that says what to change, and nothing is clobbered.
The launcher's refusals and one rank's run as real processes; the other refusals of a rank
(`train`) through the same command-line entry in this process, where only the rank's final
os._exit is replaced by a plain exit."""
import subprocess
import sys

import pytest

from fedalign_dist import cli
from tests.conftest import REPO

BASE = [sys.executable, "-m", "fedalign_dist"]


def _fail(args, env=None):
    out = subprocess.run(BASE + args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    return out.stderr


@pytest.fixture
def fail_here(monkeypatch, capfd):
    """`fedalign-dist ARGS` in this process must exit 2; returns what it wrote to stderr (file
    descriptors captured: a rank hands stderr's to faulthandler)."""
    monkeypatch.setattr(cli, "end_rank", lambda code: None)  # a rank's os._exit would end pytest

    def fail(args):
        capfd.readouterr()
        with pytest.raises(SystemExit) as done:
            cli.main(args)
        err = capfd.readouterr().err
        assert done.value.code == 2, (done.value.code, err[-3000:])
        return err
    return fail


def test_bad_configs_fail_before_anything_starts(tmp_path, fail_here):
    assert "did you mean 'fed.rounds'" in _fail(["run", "--config", "configs/demo.yaml", "fed.round=2"])
    assert "exceeds fed.num_clients" in _fail(["train", "--config", "configs/demo.yaml", "fed.clients_per_round=9"])
    assert "not a directory" in fail_here(["train", "--config", "configs/demo.yaml", f"model.path={tmp_path}/none"])
    assert "data.alpha" in fail_here(["train", "--config", "configs/demo.yaml", "fed.num_clients=200",
                                      "fed.clients_per_round=2", "data.alpha=0.01"])


def test_world_size_larger_than_clients(fail_here, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert "world size 4 exceeds fed.num_clients (2)" in fail_here(
        ["train", "--config", "configs/demo.yaml", "fed.num_clients=2", "fed.clients_per_round=1"])


def test_existing_run_folder_is_not_overwritten(tmp_path, fail_here):
    from fedalign_dist.run_folder import mark_run_folder
    run = tmp_path / "demo"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    # a folder fedalign_dist did not create is never touched, overwrite or not
    for extra in ([], ["run.overwrite=true"], ["run.resume=auto"]):
        err = fail_here(["train", "--config", "configs/demo.yaml", f"run.output_dir={tmp_path}", *extra])
        assert "is not a fedalign_dist run folder" in err, err
    mark_run_folder(run)
    assert "run.overwrite=true" in fail_here(["train", "--config", "configs/demo.yaml", f"run.output_dir={tmp_path}"])
    assert (run / "metrics.jsonl").read_text() == "precious\n"


def test_the_reported_data_loss_cases_are_refused(tmp_path, fail_here):
    """run.resume=auto on a user's folder, and run.name=.. (the parent of output_dir)."""
    out = tmp_path / "x"
    (out / "mydata").mkdir(parents=True)
    (out / "mydata/thesis.tex").write_text("years of work")
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling/notes.txt").write_text("mine")
    base = ["train", "--config", "configs/demo.yaml", f"run.output_dir={out}"]
    assert "is not a fedalign_dist run folder" in fail_here(base + ["run.name=mydata", "run.resume=auto"])
    assert "run.name must be one plain folder name" in fail_here(base + ["run.name=..", "run.overwrite=true"])
    assert (out / "mydata/thesis.tex").read_text() == "years of work"
    assert (tmp_path / "sibling/notes.txt").read_text() == "mine"


def test_partition_command_prints_table_and_writes_png(tmp_path):
    png = tmp_path / "p.png"
    out = subprocess.run(BASE + ["partition", "--config", "configs/demo.yaml", "--png", str(png)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "business" in lines[1] and len([l for l in lines if l.strip()[:1].isdigit()]) == 8
    assert png.stat().st_size > 1000


def test_resume_refuses_what_cannot_be_resumed(tmp_path, fail_here):
    from fedalign_dist.run_folder import mark_run_folder
    finished = tmp_path / "demo"
    (finished / "final").mkdir(parents=True)
    mark_run_folder(finished)
    (finished / "metrics.jsonl").write_text("precious\n")
    base = ["train", "--config", "configs/demo.yaml", f"run.output_dir={tmp_path}"]
    assert "no intact checkpoint" in fail_here(base + ["run.resume=true"])
    # auto with a finished run and no checkpoint: nothing to resume, and it is not deleted
    assert "run.overwrite=true" in fail_here(base + ["run.resume=auto"])
    assert (finished / "metrics.jsonl").read_text() == "precious\n"
    assert "set only one of them" in fail_here(base + ["run.resume=true", "run.overwrite=true"])


def test_resume_with_a_different_experiment_is_refused(tmp_path, tiny_overrides, fail_here):
    import fedalign_dist as fd
    from fedalign_dist import checkpoint
    fd.run(fd.load_config("configs/demo.yaml", [*tiny_overrides, "run.name=r", "fed.rounds=1", "checkpoint.every=1"]))
    assert checkpoint.latest_checkpoint(tmp_path / "r") is not None
    err = fail_here(["train", "--config", "configs/demo.yaml", *tiny_overrides, "run.name=r", "run.resume=true",
                 "strategy.name=fedavg", "fed.rounds=2"])
    assert "different values of strategy.name;" in err  # and only that: fed.rounds may change


def test_a_dense_checkpoint_with_an_moe_strategy_fails_once_before_any_rank_starts(tmp_path):
    from fedalign_dist.config import load_config
    from fedalign_dist.data.tokenizer import ByteTokenizer
    from fedalign_dist.models.build import dense_base
    cfg = load_config(None, ["model.family=llama", "strategy.name=fedamole", "data.tokenizer=byte"])
    dense_base(cfg, ByteTokenizer()).save_pretrained(tmp_path / "dense")
    out = subprocess.run(BASE + ["run", "--nproc", "2", f"model.path={tmp_path / 'dense'}", "data.tokenizer=byte",
                                 "strategy.name=fedalign", f"run.output_dir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("is a dense (llama) checkpoint; strategy fedalign needs") == 1
    assert "ChildFailedError" not in out.stdout + out.stderr and not (tmp_path / "run").exists()


def test_run_refuses_before_launching_any_process(tmp_path):
    """`fedalign-dist run` asks every rank's refusals itself: one line, exit 2, no torchrun."""
    run = tmp_path / "demo"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    cases = {"is not a fedalign_dist run folder": [f"run.output_dir={tmp_path}"],
             "no intact checkpoint to resume from": [f"run.output_dir={tmp_path}", "run.name=new", "run.resume=true"],
             "world size 3 exceeds fed.num_clients (2)": ["fed.num_clients=2", "fed.clients_per_round=2"],
             "left a client with fewer than": ["fed.num_clients=200", "fed.clients_per_round=2", "data.alpha=0.01"]}
    for message, extra in cases.items():
        err = _fail(["run", "--nproc", "3", "--config", "configs/demo.yaml", *extra])
        assert message in err and "Traceback" not in err and "ChildFailedError" not in err, err[-2000:]
        assert len([line for line in err.splitlines() if line.startswith("fedalign-dist: error")]) == 1
    assert (run / "notes.txt").read_text() == "mine\n" and not (tmp_path / "new").exists()


def test_ranks_that_client_groups_do_not_divide_are_named_first():
    # batch size 8 does not split over groups of 3 either, but G=3 itself is the mistake here
    err = _fail(["run", "--nproc", "4", "--config", "configs/demo.yaml", "fed.ranks_per_client=3"])
    assert "world size 4 is not a multiple of fed.ranks_per_client=3" in err and "batch_size" not in err, err


USER_FILES = ["final/notes.txt", "final/model/my_eval.json", "checkpoints/notes.txt",
              "checkpoints/round_00001/mine.txt", "checkpoints/blobs/ab/notes.txt", "clients/rank0/notes.txt",
              "tb/notes.txt", "report/my_figure.png"]


def test_a_user_file_in_any_run_subfolder_refuses_the_overwrite(tmp_path, tiny_overrides, fail_here, monkeypatch):
    """run.overwrite=true (and a resume, which replaces final/, tb/ and old checkpoints) deletes
    only what the run wrote: a user's file inside any of the run's subfolders refuses it in one
    line naming the file, before anything is deleted; the run's own files, all of them, go."""
    import fedalign_dist as fd
    from fedalign_dist.config import load_config
    from fedalign_dist.report import write_report
    from fedalign_dist.run_folder import MARKER, prepare_run_dir
    config = [*tiny_overrides, "run.name=r", "checkpoint.every=1", "fed.client_state=disk"]
    fd.run(fd.load_config("configs/demo.yaml", config))  # everything a run writes, and the report's plots
    run = tmp_path / "r"
    write_report(run)

    def files(but=None):
        return sorted(rel for p in run.rglob("*") if p.is_file() and (rel := p.relative_to(run).as_posix()) != but)
    written = files()
    assert {"final/global.safetensors", "report/accuracy.png", "checkpoints/round_00001/meta.json"} <= set(written)
    assert any(p.startswith("checkpoints/blobs/") for p in written) and any(p.startswith("tb/") for p in written)
    train = ["train", "--config", "configs/demo.yaml", *config]
    for rel in USER_FILES:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("mine")
        for extra in (["run.overwrite=true"], ["run.resume=true"])[:2 if rel.startswith(("final/", "tb/")) else 1]:
            err = fail_here(train + extra)
            assert f"{run / rel} was not written by fedalign_dist" in err and "nothing was changed" in err, err
            assert len(err.strip().splitlines()) == 1, err
        if rel == "final/notes.txt":  # the user's command refuses before launching any rank
            err = _fail(["run", "--nproc", "2", "--config", "configs/demo.yaml", *config, "run.overwrite=true"])
            assert f"{run / rel} was not written by fedalign_dist" in err, err
        assert (run / rel).read_text() == "mine" and files(but=rel) == written
        (run / rel).unlink()
    # with the user's file beside the run's folders only, everything the run wrote goes: the
    # finished run's, then what a run that crashed in its first checkpoint leaves behind
    (run / "notes.txt").write_text("mine")
    monkeypatch.setenv("FEDALIGN_DIST_FAULT", "checkpoint_commit@0")
    with pytest.raises(RuntimeError, match="injected fault"):
        fd.run(fd.load_config("configs/demo.yaml", [*config, "run.overwrite=true"]))
    monkeypatch.delenv("FEDALIGN_DIST_FAULT")
    assert (run / "checkpoints/round_00000.tmp").is_dir() and not (run / "final").exists()
    assert prepare_run_dir(load_config("configs/demo.yaml", [*config, "run.overwrite=true"])) == run
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [MARKER, "config.yaml", "notes.txt"]
