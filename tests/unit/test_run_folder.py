"""Run folders: nothing that fedalign_dist did not write is ever deleted or overwritten, for
every combination of run.name, run.resume and run.overwrite."""
import itertools
import json

import pytest

from fedalign_dist.config import ConfigError, load_config
from fedalign_dist.run_folder import MARKER, clear_run_folder, is_run_folder, mark_run_folder, prepare_run_dir

USER_FILES = {"beside.txt": "beside the output folder", "out/mydata/thesis.tex": "years of work",
              "out/sibling/notes.txt": "a sibling folder", "out/top.txt": "in the output folder",
              "out/oldrun/notes.txt": "inside a real run folder"}


def _user_files(root):
    for rel, text in USER_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    old_run = root / "out/oldrun"  # a finished run with a note the user put inside it
    mark_run_folder(old_run)
    (old_run / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")
    (old_run / "final").mkdir()


def _prepare(root, *overrides):
    try:
        cfg = load_config(None, [f"run.output_dir={root / 'out'}", *overrides])
        return prepare_run_dir(cfg)
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        return err


NAMES = ["mydata", "..", ".", "sibling/..", "a/b", "oldrun", "fresh", "../out/mydata", "mydata/"]
RESUME = ["false", "true", "auto"]
OVERWRITE = ["false", "true"]


@pytest.mark.parametrize("name", NAMES)
def test_user_files_survive_every_combination(tmp_path, name):
    _user_files(tmp_path)
    for resume, overwrite in itertools.product(RESUME, OVERWRITE):
        outcome = _prepare(tmp_path, f"run.name={name}", f"run.resume={resume}", f"run.overwrite={overwrite}")
        for rel, text in USER_FILES.items():
            assert (tmp_path / rel).read_text() == text, (name, resume, overwrite, rel, outcome)
        if name in ("..", ".", "sibling/..", "a/b", "../out/mydata", "mydata/"):
            assert isinstance(outcome, ConfigError) and "one plain folder name" in str(outcome)
        if name == "mydata":  # a user's folder: never becomes a run
            assert isinstance(outcome, Exception) and not is_run_folder(tmp_path / "out/mydata"), outcome


def test_overwrite_replaces_only_what_a_run_wrote(tmp_path):
    _user_files(tmp_path)
    run = _prepare(tmp_path, "run.name=oldrun", "run.overwrite=true")
    assert run == tmp_path / "out/oldrun" and is_run_folder(run)
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, "config.yaml", "notes.txt"])


def test_resume_auto_never_deletes_a_run_with_progress(tmp_path, capsys):
    run = tmp_path / "out/r"
    mark_run_folder(run)
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")
    damaged = run / "checkpoints/round_00000"
    damaged.mkdir(parents=True)
    (damaged / "global.safetensors").write_text("corrupt")  # no manifest: not intact
    err = _prepare(tmp_path, "run.name=r", "run.resume=auto")
    assert isinstance(err, FileExistsError)
    assert "1 logged rounds" in str(err) and "1 checkpoint(s), none intact" in str(err)
    assert "run.overwrite=true" in str(err) and (damaged / "global.safetensors").exists()
    # a run that died before logging anything is started again
    (run / "metrics.jsonl").unlink()
    import shutil
    shutil.rmtree(run / "checkpoints")
    (run / "tb").mkdir()
    (run / "scratch.txt").write_text("user's")
    assert _prepare(tmp_path, "run.name=r", "run.resume=auto") == run
    assert not (run / "tb").exists() and (run / "scratch.txt").read_text() == "user's"


def test_clear_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f/a.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a fedalign_dist run folder"):
        clear_run_folder(tmp_path / "f")
    assert (tmp_path / "f/a.txt").exists()


def test_a_file_in_place_of_the_run_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/r").write_text("a file")
    err = _prepare(tmp_path, "run.name=r", "run.overwrite=true")
    assert isinstance(err, FileExistsError) and (tmp_path / "out/r").read_text() == "a file"
