"""Run folders: the project writes into, and deletes from, only folders it marked as its own.

A run folder is `run.output_dir / run.name` (run.name is one plain path component, checked by
the config). Starting a run creates it with a marker file; replacing it (`run.overwrite=true`,
or `run.resume=auto` restarting a run that died before it logged anything) removes only the
artefacts a run writes, never a folder without the marker and never a file the project did not
write (run_manifest.py proves which those are, inside the run's subfolders): a user's file in
one of them refuses the replacement, or a resume, which would replace final/, tb/ and old
checkpoints. Rank 0 calls these."""
from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path

from fedalign_dist import checkpoint, json_files
from fedalign_dist.config import Config, dump_config
from fedalign_dist.config_sections import resume_free_keys
from fedalign_dist.run_manifest import FOLDERS, MANIFEST, unproven_files

MARKER = ".fedalign_dist_run.json"
ARTEFACTS = ("config.yaml", "model.json", "model.json.tmp", "data.json", "data.json.tmp", "metrics.jsonl",
             "metrics.jsonl.tmp", "summary.json", "summary.json.tmp", "summary.md", ".shared_check", MANIFEST,
             f"{MANIFEST}.tmp", *FOLDERS)
"""Everything a run (or `fedalign-dist report`) writes in its folder, besides the marker; inside
the FOLDERS only what run_manifest.py proves is the project's."""


def is_run_folder(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()


def mark_run_folder(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text(json_files.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                    "tool": "fedalign_dist"}))


def progress_of(run_dir: Path) -> list[str]:
    """What a run folder holds that must never be deleted without being asked to."""
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        found.append(f"{len(metrics.read_text().splitlines())} logged rounds (metrics.jsonl)")
    rounds = sorted((run_dir / "checkpoints").glob("round_?????")) if (run_dir / "checkpoints").is_dir() else []
    if rounds:
        found.append(f"{len(rounds)} checkpoint(s), none intact")
    if (run_dir / "final").exists() or (run_dir / "summary.json").exists():
        found.append("a finished run (final/, summary.json)")
    return found


def clear_run_folder(run_dir: Path) -> list[str]:
    """Remove a marked run folder's artefacts; returns the names of other entries, kept."""
    if not is_run_folder(run_dir):
        raise FileExistsError(not_a_run_message(run_dir))
    check_no_user_files(run_dir, "replacing")
    kept = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in ARTEFACTS and entry.name != MARKER:
            kept.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return kept


def check_no_user_files(run_dir: Path, doing: str) -> None:
    """Refuse, before anything is deleted, while a run subfolder holds a file the project did
    not write: `doing` the run would delete it."""
    foreign = unproven_files(run_dir)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        legacy = (f" (a run folder of a version older than the record of written files, {MANIFEST}, cannot tell "
                  f"its own final/ and report/ from yours: delete those yourself)"
                  if not (run_dir / MANIFEST).exists() else "")
        raise FileExistsError(
            f"{run_dir / foreign[0]}{more} was not written by fedalign_dist, and {doing} the run in {run_dir} "
            f"would delete it; nothing was changed: move it out of the run folder, or choose another "
            f"run.name{legacy}")


def not_a_run_message(run_dir: Path) -> str:
    return (f"{run_dir} exists and is not a fedalign_dist run folder (it has no {MARKER}); nothing in it is "
            f"deleted or overwritten: choose another run.name or run.output_dir")


def check_shared_run_folder(run_dir: Path, token: str | None) -> None:
    """Every rank must see the folder rank 0 prepared: ranks stage client states there and
    read checkpoints from it. `token`: what rank 0 wrote into it (None on other ranks)."""
    import socket

    from fedalign_dist.distributed.collectives import all_gather_json
    token = all_gather_json(token)[0]
    marker = run_dir / ".shared_check"
    sees = marker.is_file() and marker.read_text() == token
    views = all_gather_json({"host": socket.gethostname(), "sees": sees})
    blind = [f"rank {r} on {v['host']}" for r, v in enumerate(views) if not v["sees"]]
    if blind:
        raise FileNotFoundError(
            f"the run folder {run_dir} that rank 0 prepared on {views[0]['host']} is not visible to "
            f"{', '.join(blind)}: "
            f"every rank stages client states and reads checkpoints there, so run.output_dir must be one folder on "
            f"a file system shared by every node (an absolute path on a shared mount)"
        )


def write_share_token(run_dir: Path) -> str:
    token = secrets.token_hex(16)
    (run_dir / ".shared_check").write_text(token)
    return token


def plan_run_dir(cfg: Config) -> str:
    """What preparing the run folder will do: 'resume', 'restart' (clear a marked run's
    artefacts) or 'start'; raises what it would refuse. Changes nothing, so `fedalign-dist
    run` asks it before launching any process."""
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a folder: choose another run.name or run.output_dir")
    if cfg.run.resume is not False and checkpoint.latest_checkpoint(run_dir, warn=False) is not None:
        check_resumable(cfg, run_dir / "config.yaml")
        check_no_user_files(run_dir, "resuming")
        return "resume"
    if cfg.run.resume is True:
        raise FileNotFoundError(f"run.resume=true but {run_dir} has no intact checkpoint to resume from "
                                f"(checkpoint.every writes them)")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not is_run_folder(run_dir):
        raise FileExistsError(not_a_run_message(run_dir))
    if occupied:
        progress = progress_of(run_dir)
        if cfg.run.resume == "auto" and progress:
            raise FileExistsError(
                f"run.resume=auto: {run_dir} has {'; '.join(progress)} but no intact checkpoint to resume from, "
                f"and is kept as it is; to start it again pass run.resume=false run.overwrite=true, or choose "
                f"another run.name")
        if cfg.run.resume is False and not cfg.run.overwrite:
            raise FileExistsError(f"run folder {run_dir} already exists: choose another run.name, "
                                  f"or pass run.overwrite=true to replace it")
        check_no_user_files(run_dir, "replacing")
        return "restart"  # overwrite=true, or auto on a run that died before logging a round
    return "start"


def prepare_run_dir(cfg: Config) -> Path:
    """Rank 0, before training: resume, (re)start or refuse, deleting nothing that is not a run's."""
    run_dir = cfg.run_dir
    action = plan_run_dir(cfg)
    if action == "resume":
        return run_dir  # the Runner restores it
    if action == "restart":
        kept = clear_run_folder(run_dir)
        if kept:
            print(f"note: kept {', '.join(kept)} in {run_dir} (not written by fedalign_dist)", flush=True)
    mark_run_folder(run_dir)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def check_resumable(cfg: Config, saved_path: Path) -> None:
    """Resuming with a different experiment would silently mix two runs: refuse it."""
    from fedalign_dist.config import ConfigError, load_config
    if not saved_path.exists():
        return
    saved = load_config(saved_path).model_dump()
    now = cfg.model_dump()

    def leaves(tree, prefix=()):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, prefix + (key,))
            else:
                yield prefix + (key,), value

    old = dict(leaves(saved))
    free = resume_free_keys(type(cfg))  # marked where they are defined (config_sections.RESUME_FREE)
    changed = [".".join(k) for k, v in leaves(now) if k not in free and old.get(k) != v]
    if changed:
        raise ConfigError(f"cannot resume {saved_path.parent}: its run used different values of "
                          f"{', '.join(changed)}; resume with the same configuration (only "
                          f"{', '.join('.'.join(k) for k in sorted(free))} may change) or start a new run.name")
