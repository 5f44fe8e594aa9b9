"""Which files inside a run folder's subfolders the project wrote, so that replacing or resuming
a run deletes only those: a file a user put into final/, checkpoints/ or any other of the run's
folders is never taken for the run's.

A file is the project's when one of these proves it:
  recorded     final/ (laid out by save_pretrained or a strategy's export) and report/'s plots
               are listed in MANIFEST by the process that wrote them, right after writing;
  described    a committed checkpoint lists its own files in its meta.json;
  named        what every rank writes concurrently, round after round, carries a name only the
               project gives: the blob pool (checkpoints/blobs/XX/SHA256.safetensors), the disk
               client states (clients/rankR/client_NNNNNN/KEY.safetensors), TensorBoard's event
               file, and the staging folders final.tmp/ and checkpoints/round_NNNNN.tmp/, which
               the project creates empty and fills itself; and a checkpoint's own file names,
               so that a damaged checkpoint (its meta.json lost) still falls back to the previous
               one instead of refusing the resume.
A crash between writing and recording leaves a file unproven: replacing the run then refuses
(safe), it never deletes."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fedalign_dist import json_files

MANIFEST = ".fedalign_dist_written.json"
FOLDERS = ("tb", "checkpoints", "clients", "final", "final.tmp", "report")
"""The run's own subfolders (run_folder.ARTEFACTS); everything in them must be proven."""

NAMED = re.compile(
    r"final\.tmp/.+"
    r"|checkpoints/round_\d{5}\.tmp/.+"
    r"|checkpoints/round_\d{5}/(global(\.part\d{3}-of-\d{3})?\.safetensors|strategy\.(json|safetensors|pt)|meta\.json"
    r"|client_states/rank_\d{5}\.json)"
    r"|checkpoints/blobs/(?P<pre>[0-9a-f]{2})/(?P=pre)[0-9a-f]{62}\.safetensors(\.\d+\.[0-9a-f]{8}\.tmp)?"
    r"|clients/rank\d+/client_\d{6}/[^/]+\.(safetensors|tmp)"
    r"|tb/events\.out\.tfevents\.[^/]+")
CHECKPOINT = re.compile(r"(checkpoints/round_\d{5})/")


def files_under(root: Path) -> list[Path]:
    """Every file below `root` (a symbolic link counts as a file: it is never followed)."""
    if root.is_symlink() or not root.is_dir():
        return [root] if root.exists() or root.is_symlink() else []
    found = []
    for folder, dirs, files in os.walk(root):
        found += [Path(folder, name) for name in files]
        found += [Path(folder, name) for name in dirs if Path(folder, name).is_symlink()]
    return found


def recorded(run_dir: Path) -> set[str]:
    try:
        return set(json.loads((run_dir / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()  # none yet, or a folder of a version that kept none: nothing is proven by it


def record_written(run_dir: Path, *paths: Path) -> None:
    """Add the files at or below `paths` to the manifest (rank 0, or the one writing process);
    entries whose file is gone (pruned checkpoints, a replaced final/) are dropped."""
    run_dir = Path(run_dir)
    new = {p.relative_to(run_dir).as_posix() for path in paths for p in files_under(Path(path))}
    files = sorted(rel for rel in recorded(run_dir) | new if (run_dir / rel).exists())
    tmp = run_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json_files.dumps({"files": files}))
    tmp.replace(run_dir / MANIFEST)


def _described(run_dir: Path, checkpoint: str) -> set[str]:
    """A committed checkpoint's files, as its meta.json lists them."""
    try:
        files = json.loads((run_dir / checkpoint / "meta.json").read_text())["files"]
        return {f"{checkpoint}/meta.json", *(f"{checkpoint}/{rel}" for rel in files)}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def unproven_files(run_dir: Path) -> list[str]:
    """Paths (relative to `run_dir`) of the files in the run's subfolders that nothing proves
    the project wrote: a user's."""
    run_dir = Path(run_dir)
    known, described, out = recorded(run_dir), {}, []
    for name in FOLDERS:
        for path in files_under(run_dir / name):
            rel = path.relative_to(run_dir).as_posix()
            if rel in known or (not path.is_symlink() and NAMED.fullmatch(rel)):
                continue
            checkpoint = CHECKPOINT.match(rel)
            if checkpoint and not path.is_symlink():
                folder = checkpoint.group(1)
                if folder not in described:
                    described[folder] = _described(run_dir, folder)
                if rel in described[folder]:
                    continue
            out.append(rel)
    return sorted(out)
