"""A Hugging Face checkpoint (model.path) read straight into a client group's ZeRO-3 slices, so
that no rank builds the whole model on its host: every rank of the group builds the structure
(parameters on the meta device), ZeRO-3 cuts it into slices, and the group's first rank then
reads the checkpoint's files (memory-mapped: pages it has read are the file's, not the
process's) and fills one parameter at a time, gathered whole over the group while it is
written. Transformers' own conversions turn the files' layout into the model's (per-expert
tensors fused into one), one fused tensor at a time, as its DeepSpeed ZeRO-3 loader does;
that loader writes from the world's rank 0 only, where a client group's first rank may be any
rank, hence this module.

Values equal `from_pretrained(dtype=float32)`'s whenever every parameter is in the checkpoint
(`covers`) and nothing is quantized; a checkpoint that lacks a parameter (transformers would
draw it) or needs a quantizer is read whole, as before."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fedalign_dist.models.packaged import causal_lm_structure, resolve

PLAIN_DTYPES = {"F32", "BF16", "F16"}
"""What is copied as it is: a quantized checkpoint's tensors need transformers' quantizer."""


def checkpoint_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files, chosen as transformers chooses them (one file before
    an index); [] for another format, which transformers reads whole."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def loads_by_part(cfg) -> bool:
    """Whether a grouped run's model comes from a checkpoint this module can read into slices:
    full fine-tuning (LoRA's adapters are drawn from the seed on the host that holds the base)
    of an MoE checkpoint folder in safetensors, not quantized, that holds every parameter."""
    if cfg.fed.ranks_per_client == 1 or cfg.model.path is None or cfg.model.finetune != "full":
        return False
    if cfg.model.family == "llama":
        return False
    directory, gguf = resolve(cfg.model.path)
    files = checkpoint_files(directory) if gguf is None else []
    if not files or not _plain(directory, files):
        return False
    return covers(outline_of(cfg.model.path), cfg.model.path)


def _plain(directory: Path, files: list[Path]) -> bool:
    """No quantization: none in config.json, and every tensor a float of a plain dtype."""
    from safetensors import safe_open
    if "quantization_config" in json.loads((directory / "config.json").read_text()):
        return False
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if any(f.get_slice(key).get_dtype() not in PLAIN_DTYPES for key in f.keys()):
                return False
    return True


def outline_of(path: str) -> torch.nn.Module:
    """The checkpoint's model with its parameters on the meta device (no memory, no drawing)."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        return causal_lm_structure(path)


def _read(files: list[Path], values: bool) -> dict[str, torch.Tensor]:
    """{name: tensor} of every file: memory-mapped with `values`, else on the meta device."""
    from transformers.modeling_utils import load_state_dict
    state = {}
    for file in files:
        state.update(load_state_dict(str(file), map_location="cpu" if values else "meta"))
    return state


def _converted(outline: torch.nn.Module, state: dict[str, torch.Tensor]):
    """The checkpoint in the model's names and layout, one group at a time (each fused tensor,
    then the rest), by transformers' conversions; `outline` is the model on the meta device,
    which the conversions read for names and shapes (a ZeRO-3 slice's shape is not its own).
    The mapping always holds transformers' legacy renamings; base_model_prefix is added or
    stripped as from_pretrained does."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.integrations.deepspeed import _apply_weight_conversions_to_state_dict
    yield from _apply_weight_conversions_to_state_dict(outline, state, get_model_conversion_mapping(outline))


def covers(model: torch.nn.Module, path: str) -> bool:
    """Every parameter of `model` (a structure) is in the checkpoint at `path` with its shape
    (under one of its names, if tied), judged from the files' headers and meta structures
    alone: false for a checkpoint whose shapes differ (transformers, loading it whole, then
    says which) or that lacks a parameter (transformers would draw it)."""
    shapes = {}
    for group in _converted(outline_of(path), _read(checkpoint_files(resolve(path)[0]), values=False)):
        shapes.update({name: tensor.shape for name, tensor in group.items()})
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in shapes and shapes[name] != param.shape:
            return False
        aliases.setdefault(id(param), []).append(name)
    return all(any(n in shapes for n in group) for group in aliases.values())


def read_into_slices(model: torch.nn.Module, path: str, first: bool) -> None:
    """Fill the ZeRO-3 slices of `model` (partitioned over its client group) from the checkpoint
    at `path`; only `first` (the group's first rank) reads values, its partners follow the same
    names from the files' headers. Persistent buffers are written on `first` only (the caller
    sends them to the group). Every rank gathers one parameter at a time, in the same order,
    and checks what it can on every rank, so that no rank leaves its partners waiting."""
    import deepspeed
    directory, _ = resolve(path)
    outline = outline_of(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    written = set()
    for group in _converted(outline, _read(checkpoint_files(directory), values=first)):
        for name in sorted(group):
            if name in params:
                param = params[name]
                if group[name].shape != param.ds_shape:  # `covers` compared them with the structure's
                    raise RuntimeError(f"model.path {path}: {name} is {tuple(group[name].shape)} in the "
                                       f"checkpoint but {tuple(param.ds_shape)} in the model")
                written.add(id(param))
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if first:
                        with torch.no_grad():
                            param.data.copy_(group[name])
            elif name in buffers and first:
                buffers[name].data.copy_(group[name])
        del group
    unwritten = [name for name, param in params.items() if id(param) not in written]
    if unwritten:  # `loads_by_part` judged the checkpoint's own structure: a strategy whose model
        # adds parameters cannot be read by part
        raise RuntimeError(f"model.path {path}: no value was read for {', '.join(unwritten[:5])}")
