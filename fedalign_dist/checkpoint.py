"""Saving run state: periodic checkpoints (atomic) and the final artefacts. Rank 0 calls these."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fedalign_dist import faults

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where tensors are read or written: the launcher reads
# checkpoint folders (latest_checkpoint) and must not hold torch for the whole run.


def _publish(tmp: Path, target: Path, synced: set[str] = frozenset()) -> None:
    """fsync every file of `tmp` but those named in `synced` (paths relative to tmp, synced
    by their writers), then swap it in under `target` by rename."""
    for path in tmp.rglob("*"):
        if path.is_file() and str(path.relative_to(tmp)) not in synced:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _atomic_write_dir(target: Path, fill) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    _publish(tmp, target)


# -- periodic checkpoints: staged by every rank, committed by the coordinator ---------------
#   1. coordinator: begin_checkpoint()    (empty staging folder)
#   2. every rank:  its client states into staging_dir()/clients (synced; their digests, taken
#                   when the states were written, reach the coordinator)
#   3. coordinator: commit_checkpoint()   (global + strategy state, fsync, rename, prune)

def checkpoint_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_idx:05d}"


def staging_dir(run_dir: Path, round_idx: int) -> Path:
    target = checkpoint_dir(run_dir, round_idx)
    return target.with_name(target.name + ".tmp")


def begin_checkpoint(run_dir: Path, round_idx: int) -> Path:
    tmp = staging_dir(run_dir, round_idx)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(run_dir: Path, round_idx: int, global_state: dict, strategy_state: dict,
                      keep: int, client_files: list[dict[str, str]] = ()) -> Path:
    """client_files: every rank's {path: sha256} of the client states it staged (already
    synced): neither hashed nor synced again, so a checkpoint's cost follows the clients
    changed since the last one."""
    from safetensors.torch import save_file
    tmp, target = staging_dir(run_dir, round_idx), checkpoint_dir(run_dir, round_idx)
    save_file({n: t.contiguous() for n, t in global_state.items()}, str(tmp / "global.safetensors"))
    save_strategy_state(tmp, strategy_state)
    faults.maybe_raise("checkpoint_commit")
    # The manifest is written last: a checkpoint without it, or whose files do not match
    # it, is incomplete or corrupt.
    known = {rel: digest for part in client_files for rel, digest in part.items()}
    files = {str(p.relative_to(tmp)): known.get(str(p.relative_to(tmp))) or _sha256(p)
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "meta.json").write_text(json.dumps({"round": round_idx, "files": files}))
    _publish(tmp, target, synced=set(known))
    for old in sorted((run_dir / "checkpoints").glob("round_?????"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
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
    (folder / "strategy.json").write_text(json.dumps({k: v for k, v in state.items() if k not in tensors}))


def load_strategy_state(folder: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    if not (folder / "strategy.safetensors").exists() and (folder / "strategy.pt").exists():
        return torch.load(folder / "strategy.pt", weights_only=True)  # checkpoints of earlier versions
    return {**json.loads((folder / "strategy.json").read_text()), **load_file(str(folder / "strategy.safetensors"))}


def load_checkpoint(folder: Path) -> tuple[int, dict, dict]:
    """(round, global state, strategy state) of a committed checkpoint."""
    from safetensors.torch import load_file
    meta = json.loads((folder / "meta.json").read_text())
    return meta["round"], load_file(str(folder / "global.safetensors")), load_strategy_state(folder)


def write_json(path: Path, value) -> None:
    """A small JSON file, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def cut_metrics(run_dir: Path, last_round: int) -> list[dict]:
    """Keep metrics.jsonl's records up to `last_round` (the checkpoint resumed from), rewritten
    atomically; returns them."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r["round"] <= last_round]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return records


def save_final(run_dir: Path, global_state: dict, module: torch.nn.Module, finetune: str,
               base_model: torch.nn.Module | None = None,
               export: Callable[[Path], bool] | None = None) -> None:
    """final/global.safetensors always; then the strategy's own `export(folder)` if it has one
    (FedAMoLE), else LoRA: a PEFT adapter directory (final/adapter) plus, when given, the base
    model it belongs to (final/base_model); full fine-tuning: a Hugging Face checkpoint of the
    global model (final/model)."""
    from safetensors.torch import save_file

    def fill(folder: Path):
        save_file({n: t.contiguous() for n, t in global_state.items()}, str(folder / "global.safetensors"))
        if export is not None and export(folder):
            return
        if finetune == "lora":
            module.save_pretrained(str(folder / "adapter"))
            if base_model is not None:
                base_model.save_pretrained(str(folder / "base_model"))
        else:
            module.save_pretrained(str(folder / "model"))

    _atomic_write_dir(run_dir / "final", fill)
