"""A full Hugging Face checkpoint written by several processes: each writes one shard file,
model-0000i-of-0000n.safetensors, of the tensors it holds, and one writes the index that
from_pretrained follows (model.safetensors.index.json) with config.json. The client groups'
final export writes its model so, and no process gathers the whole model. Each part goes
through transformers' own save-time steps, as save_pretrained applies them to a whole state
dict: tied duplicates dropped, and the in-memory layout turned back into the on-disk one
(fused expert tensors split per expert). A conversion that would join tensors of two parts
cannot run by part: the index is checked against the whole model's names, and refuses then."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fedalign_dist.safetensors_parts import DTYPES, TensorSpec

INDEX_NAME = "model.safetensors.index.json"


def part_file_name(index: int, parts: int) -> str:
    return f"model-{index + 1:05d}-of-{parts:05d}.safetensors"


def on_disk_form(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What save_pretrained would write for these of the module's tensors (names and layouts)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
    return revert_weight_conversion(module, remove_tied_weights_from_state_dict(dict(tensors), module))


def write_model_part(folder: Path, module: torch.nn.Module, tensors: dict[str, torch.Tensor], index: int,
                     parts: int) -> dict:
    """This process's shard file; returns what the index needs of it (JSON)."""
    from safetensors.torch import save_file
    written = {n: t.detach().cpu().contiguous() for n, t in on_disk_form(module, tensors).items()}
    save_file(written, str(folder / part_file_name(index, parts)), metadata={"format": "pt"})
    return {"names": sorted(written), "bytes": sum(t.numel() * t.element_size() for t in written.values()),
            "parameters": sum(t.numel() for t in tensors.values())}


def write_model_index(folder: Path, module: torch.nn.Module, parts: list[dict], specs: dict[str, TensorSpec]) -> None:
    """config.json (and generation_config.json), as save_pretrained writes them, and the index
    of the parts; `specs` (of every tensor the parts were given) says which names the whole
    model's save would have written."""
    weight_map = {name: part_file_name(i, len(parts)) for i, part in enumerate(parts) for name in part["names"]}
    whole = {name: torch.empty(shape, dtype=DTYPES[dtype], device="meta") for name, (dtype, shape) in specs.items()}
    expected = set(on_disk_form(module, whole))
    if set(weight_map) != expected:
        missing, extra = sorted(expected - set(weight_map)), sorted(set(weight_map) - expected)
        raise RuntimeError(f"the model written by part does not match a whole save (missing {missing[:3]}, extra "
                           f"{extra[:3]}): a weight conversion joins tensors of two parts; export with "
                           f"fed.ranks_per_client=1 and report this")
    module.config.dtype = str(module.dtype).split(".")[1]  # as save_pretrained records them
    module.config.architectures = [type(module).__name__]
    module.config.save_pretrained(str(folder))
    if module.can_generate():
        module.generation_config.save_pretrained(str(folder))
    index = {"metadata": {"total_parameters": sum(p["parameters"] for p in parts),
                          "total_size": sum(p["bytes"] for p in parts)},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
