"""Saving run state: periodic checkpoints (atomic) and the final artefacts. Rank 0 calls these."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def _atomic_write_dir(target: Path, fill) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def save_checkpoint(run_dir: Path, round_idx: int, global_state: dict, strategy_state: dict, keep: int) -> Path:
    target = run_dir / "checkpoints" / f"round_{round_idx:05d}"

    def fill(folder: Path):
        save_file({n: t.contiguous() for n, t in global_state.items()}, str(folder / "global.safetensors"))
        torch.save(strategy_state, folder / "strategy.pt")
        (folder / "meta.json").write_text(json.dumps({"round": round_idx}))

    _atomic_write_dir(target, fill)
    for old in sorted((run_dir / "checkpoints").glob("round_?????"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


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
