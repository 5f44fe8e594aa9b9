"""`fedalign-dist upcycle`: a dense checkpoint folder -> an upcycled MoE checkpoint folder with
the dense model's tokenizer. Everything that can refuse is asked before anything is written,
and the folder is written under a temporary sibling name and renamed at the end, so a failure
leaves no half-written --out behind to block the rerun."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedalign_dist.config import ConfigError


def write_upcycled(dense_path: str, out: Path, experts: int, top_k: int, perturb: float, seed: int) -> None:
    from fedalign_dist.models.packaged import describe_checkpoint, load_causal_lm, load_tokenizer
    from fedalign_dist.pretrain.upcycle import upcycle
    if out.exists():
        raise FileExistsError(f"{out} exists: upcycling writes a new checkpoint folder")
    if perturb < 0:
        raise ConfigError(f"--perturb must be >= 0 (got {perturb})")
    if not describe_checkpoint(dense_path)["tokenizer"]:  # checks that it exists, too
        raise FileNotFoundError(f"--dense {dense_path} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json "
                                f"or tokenizer_config.json): the upcycled checkpoint carries the dense model's; "
                                f"save it into that folder first (tokenizer.save_pretrained)")
    try:
        tokenizer = load_tokenizer(dense_path)
    except (OSError, ValueError) as err:  # transformers' message spans several lines: its first says why
        raise ValueError(f"--dense {dense_path}: its tokenizer does not load: {str(err).strip().splitlines()[0]}")
    dense = load_causal_lm(dense_path)
    if dense.config.model_type != "llama":
        raise ValueError(f"--dense {dense_path} is a {dense.config.model_type} model: upcycling takes a Llama-"
                         f"architecture decoder")
    moe = upcycle(dense, experts, top_k, perturb, seed)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        moe.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, out)  # fails, rather than merges, if --out appeared meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
