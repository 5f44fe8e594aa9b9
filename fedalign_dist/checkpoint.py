"""Saving run state: periodic checkpoints (atomic) and the final artefacts. Rank 0 calls these."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fedalign_dist import faults, json_files

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where tensors are read or written: the launcher reads
# checkpoint folders (latest_checkpoint) and must not hold torch for the whole run.


def _publish(tmp: Path, target: Path) -> None:
    """fsync every file of `tmp`, then swap it in under `target` by rename."""
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def final_staging(run_dir: Path) -> Path:
    """Where final/ is assembled before it is published whole (a rename)."""
    return run_dir / "final.tmp"


def begin_final(run_dir: Path) -> Path:
    """An empty staging folder for final/, which several ranks then fill (client groups)."""
    tmp = final_staging(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_final(run_dir: Path) -> None:
    _publish(final_staging(run_dir), run_dir / "final")


def _atomic_write_dir(target: Path, fill) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    _publish(tmp, target)


# -- periodic checkpoints: staged by every rank, committed by the coordinator ---------------
#   1. coordinator: begin_checkpoint()     (empty staging folder)
#   2. every rank:  its client states' new contents into the blob pool (store.export_to),
#                   then stage_client_part(): {client/key: sha256} of every state it holds
#   3. coordinator: commit_checkpoint()    (global + strategy state, fsync, rename, prune)
# Client states live in checkpoints/blobs/, named by their sha256 and shared by every
# checkpoint that holds them: a checkpoint writes, links and syncs only the states changed
# since the previous one, and its own folder has a handful of files whatever the clients.

CLIENT_PARTS = "client_states"
"""A checkpoint's folder of per-rank parts: {"client_000012/personal": sha256, ...}."""


def checkpoint_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_idx:05d}"


def staging_dir(run_dir: Path, round_idx: int) -> Path:
    target = checkpoint_dir(run_dir, round_idx)
    return target.with_name(target.name + ".tmp")


def blob_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "blobs"


def blob_path(blobs: Path, digest: str) -> Path:
    return blobs / digest[:2] / f"{digest}.safetensors"


def begin_checkpoint(run_dir: Path, round_idx: int) -> Path:
    tmp = staging_dir(run_dir, round_idx)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / CLIENT_PARTS).mkdir(parents=True)
    return tmp


def stage_client_part(run_dir: Path, round_idx: int, rank: int, entries: dict[str, str]) -> None:
    """One rank's part of the checkpoint's client index; the blobs it names are already
    in the pool, synced."""
    path = staging_dir(run_dir, round_idx) / CLIENT_PARTS / f"rank_{rank:05d}.json"
    with open(path, "w") as f:
        f.write(json_files.dumps(entries))
        f.flush()
        os.fsync(f.fileno())


def stage_global_part(run_dir: Path, round_idx: int, index: int, parts: int, shard: dict) -> None:
    """One shard of the global state, written by the rank that holds it (client groups: rank i of
    the first group writes shard i), so no rank gathers the whole state to checkpoint it."""
    from safetensors.torch import save_file
    path = staging_dir(run_dir, round_idx) / f"global.part{index:03d}-of-{parts:03d}.safetensors"
    save_file({n: t.contiguous() for n, t in shard.items()}, str(path))


def commit_checkpoint(run_dir: Path, round_idx: int, global_state: dict | None, strategy_state: dict,
                      keep: int) -> Path:
    """`global_state` None: its shards are staged already (stage_global_part)."""
    from safetensors.torch import save_file
    tmp, target = staging_dir(run_dir, round_idx), checkpoint_dir(run_dir, round_idx)
    if global_state is not None:
        save_file({n: t.contiguous() for n, t in global_state.items()}, str(tmp / "global.safetensors"))
    save_strategy_state(tmp, strategy_state)
    faults.maybe_raise("checkpoint_commit")
    # The manifest is written last: a checkpoint without it, or whose files do not match
    # it, is incomplete or corrupt.
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "meta.json").write_text(json_files.dumps({"round": round_idx, "files": files}))
    _publish(tmp, target)
    prune_checkpoints(run_dir, keep)
    return target


def client_entries(folder: Path) -> dict[tuple[int, str], tuple[Path, str | None]]:
    """(client, key) -> (file, sha256 or None where unrecorded) of a committed checkpoint's
    client states, read from its parts (or, for checkpoints of earlier versions, from the
    client_XXXXXX/KEY.safetensors files of its clients/ folder)."""
    folder = Path(folder)
    out = {}
    if (folder / CLIENT_PARTS).is_dir():
        blobs = blob_dir(folder.parent.parent)
        for name, digest in _client_index(folder).items():
            client, key = name.split("/", 1)
            out[(int(client.removeprefix("client_")), key)] = (blob_path(blobs, digest), digest)
        return out
    for path in sorted((folder / "clients").glob("client_*/*.safetensors")):
        out[(int(path.parent.name.removeprefix("client_")), path.name.removesuffix(".safetensors"))] = (path, None)
    return out


def _client_index(folder: Path) -> dict[str, str]:
    """{"client_XXXXXX/KEY": sha256} over the ranks' parts of a checkpoint."""
    index = {}
    for part in sorted((folder / CLIENT_PARTS).glob("rank_*.json")):
        index.update(json.loads(part.read_text()))
    return index


def _blob_digests(folder: Path) -> set[str]:
    try:
        return set(_client_index(folder).values())
    except (OSError, ValueError):
        return set()  # a damaged checkpoint keeps no blob alive


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; a blob goes with the last checkpoint naming it."""
    folders = sorted((run_dir / "checkpoints").glob("round_?????"))
    old, kept = folders[:-keep], folders[-keep:]
    if not old:
        return
    alive = set().union(*map(_blob_digests, kept))
    for folder in old:
        for digest in _blob_digests(folder) - alive:
            blob_path(blob_dir(run_dir), digest).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def sweep_blobs(run_dir: Path) -> int:
    """Remove the blobs that no checkpoint names (staged by a checkpoint that never
    committed); call when no rank is staging. Returns how many went."""
    alive = set().union(*map(_blob_digests, (run_dir / "checkpoints").glob("round_?????")))
    gone = 0
    for path in blob_dir(run_dir).glob("*/*.safetensors"):
        if path.name.removesuffix(".safetensors") not in alive:
            path.unlink(missing_ok=True)
            gone += 1
    return gone


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact (its client states included), else
    what is wrong with it."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"no readable manifest ({type(err).__name__})"
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if _sha256(path) != digest:
            return f"{rel} does not match its checksum"
    checked = set()
    for (client, key), (path, digest) in client_entries(folder).items():
        if digest is None or digest in checked:
            continue  # an earlier version's file: checked above, through the manifest
        if not path.is_file():
            return f"client {client}'s {key} state ({path.name}) is missing"
        if _sha256(path) != digest:
            return f"client {client}'s {key} state ({path.name}) does not match its checksum"
        checked.add(digest)
    return None


def latest_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are skipped with a warning."""
    for folder in sorted((run_dir / "checkpoints").glob("round_?????"), reverse=True):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        if warn:
            print(f"WARNING: checkpoint {folder} is unusable ({problem}); trying the previous one",
                  file=sys.stderr, flush=True)
    return None


def save_strategy_state(folder: Path, state: dict) -> None:
    """Tensors as safetensors, everything else (None, numbers, strings) as JSON: a checkpoint
    holds data only, never code that loading it would run (as unpickling can)."""
    import torch
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(folder / "strategy.safetensors"))
    (folder / "strategy.json").write_text(json_files.dumps({k: v for k, v in state.items() if k not in tensors}))


def load_strategy_state(folder: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    if not (folder / "strategy.safetensors").exists() and (folder / "strategy.pt").exists():
        return torch.load(folder / "strategy.pt", weights_only=True)  # checkpoints of earlier versions
    return {**json.loads((folder / "strategy.json").read_text()), **load_file(str(folder / "strategy.safetensors"))}


def load_checkpoint(folder: Path, names=None) -> tuple[int, dict, dict]:
    """(round, global state, strategy state) of a committed checkpoint; with `names`, only those
    tensors of the global state are read (client groups keep it by shard). The global state is
    one file, or one file per shard (written by a client group of any size: any G reads it)."""
    from safetensors import safe_open
    meta = json.loads((folder / "meta.json").read_text())
    state = {}
    for path in sorted(folder.glob("global*.safetensors")):
        with safe_open(str(path), framework="pt") as saved:
            state.update({n: saved.get_tensor(n) for n in saved.keys() if names is None or n in names})
    missing = [n for n in (names or []) if n not in state]
    if missing:
        raise ValueError(f"{folder} has no global tensor {missing[0]} ({len(missing)} missing): it was written "
                         f"for another model; resume it with the model it was written with")
    if names is not None:  # in the order asked for (a file lists its tensors sorted)
        state = {n: state[n] for n in names}
    return meta["round"], state, load_strategy_state(folder)


def write_json(path: Path, value) -> None:
    """A small JSON file, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_files.dumps(value, indent=2))
    tmp.replace(path)


def cut_metrics(run_dir: Path, last_round: int) -> list[dict]:
    """Keep metrics.jsonl's records up to `last_round` (the checkpoint resumed from), rewritten
    atomically; returns them."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r["round"] <= last_round]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json_files.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return records


def save_final(run_dir: Path, global_state: dict, module: torch.nn.Module, finetune: str,
               base_model: torch.nn.Module | None = None,
               export: Callable[[Path], bool] | None = None, module_state: dict | None = None) -> None:
    """final/global.safetensors always; then the strategy's own `export(folder)` if it has one
    (FedAMoLE), else LoRA: a PEFT adapter directory (final/adapter) plus, when given, the base
    model it belongs to (final/base_model); full fine-tuning: a Hugging Face checkpoint of the
    global model (final/model); either from `module_state` when given (a LoRA adapter under
    client groups, whose module holds slices; a full model there is written by part, see
    RunLifecycle._export_by_part)."""
    from safetensors.torch import save_file

    def fill(folder: Path):
        save_file({n: t.contiguous() for n, t in global_state.items()}, str(folder / "global.safetensors"))
        if export is not None and export(folder):
            return
        if finetune == "lora":
            module.save_pretrained(str(folder / "adapter"), state_dict=module_state)
            if base_model is not None:
                base_model.save_pretrained(str(folder / "base_model"))
        else:
            module.save_pretrained(str(folder / "model"), state_dict=module_state)

    _atomic_write_dir(run_dir / "final", fill)
