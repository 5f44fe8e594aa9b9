"""Saving run state: periodic checkpoints (atomic) and the final artefacts. Rank 0 calls these."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _publish(tmp: Path, target: Path) -> None:
    """fsync every file of `tmp`, then swap it in under `target` by rename."""
    for path in tmp.rglob("*"):
        if path.is_file():
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
#   2. every rank:  its client states into staging_dir()/clients
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
                      keep: int) -> Path:
    tmp, target = staging_dir(run_dir, round_idx), checkpoint_dir(run_dir, round_idx)
    save_file({n: t.contiguous() for n, t in global_state.items()}, str(tmp / "global.safetensors"))
    torch.save(strategy_state, tmp / "strategy.pt")
    (tmp / "meta.json").write_text(json.dumps({"round": round_idx}))
    _publish(tmp, target)
    for old in sorted((run_dir / "checkpoints").glob("round_?????"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in (run_dir / "checkpoints").glob("round_?????") if (p / "meta.json").is_file())
    return done[-1] if done else None


def load_checkpoint(folder: Path) -> tuple[int, dict, dict]:
    """(round, global state, strategy state) of a committed checkpoint."""
    meta = json.loads((folder / "meta.json").read_text())
    return meta["round"], load_file(str(folder / "global.safetensors")), torch.load(folder / "strategy.pt")


def save_final(run_dir: Path, global_state: dict, module: torch.nn.Module, finetune: str,
               base_model: torch.nn.Module | None = None) -> None:
    """final/global.safetensors always; LoRA: a PEFT adapter directory (final/adapter) plus,
    when given, the base model it belongs to (final/base_model); full fine-tuning: a Hugging
    Face checkpoint of the global model (final/model)."""
    def fill(folder: Path):
        save_file({n: t.contiguous() for n, t in global_state.items()}, str(folder / "global.safetensors"))
        if finetune == "lora":
            module.save_pretrained(str(folder / "adapter"))
            if base_model is not None:
                base_model.save_pretrained(str(folder / "base_model"))
        else:
            module.save_pretrained(str(folder / "model"))

    _atomic_write_dir(run_dir / "final", fill)
