"""A full Hugging Face checkpoint written by several processes: each writes one shard file,
model-0000i-of-0000n.safetensors, of the tensors it holds, and one writes the index that
from_pretrained follows (model.safetensors.index.json) with config.json. The client groups'
final export writes its model so, and no process gathers the whole model. Each part goes
through transformers' own save-time steps, as save_pretrained applies them to a whole state
dict: tied duplicates dropped, and the in-memory layout turned back into the on-disk one
(fused expert tensors split per expert). A conversion that would join tensors of two parts
cannot run by part: the parts are checked against what a whole save writes (each name once,
with its shape and dtype), and refused then."""
from __future__ import annotations

from pathlib import Path

import torch

from fedalign_dist import json_files
from fedalign_dist.safetensors_parts import DTYPES, TensorSpec, spec_of

INDEX_NAME = "model.safetensors.index.json"


_MISMATCH = ("the model written by part does not match a whole save ({}): a weight conversion joins tensors "
             "of two parts; run with fed.ranks_per_client=1 and report this")


def _meta(specs: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=DTYPES[dtype], device="meta") for name, (dtype, shape) in specs.items()}


def _plain(spec: TensorSpec) -> list:
    """A spec as it returns from JSON (sent between ranks), to compare with one made here."""
    dtype, shape = spec
    return [dtype, list(shape)]


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
    parameters = {n for n, _ in module.named_parameters()}  # what save_pretrained's index counts
    return {"specs": {n: spec_of(t) for n, t in sorted(written.items())},
            "bytes": sum(t.numel() * t.element_size() for t in written.values()),
            "parameters": sum(t.numel() for n, t in tensors.items() if n in parameters)}


def check_plan(module: torch.nn.Module, plan: list[dict[str, TensorSpec]]) -> None:
    """Refuse, before anything is trained, a model that cannot be written by these parts
    (`plan`: the specs of the tensors each part will be given): each part's on-disk form,
    taken on the meta device, must together make what a whole save writes."""
    forms = [{"specs": {n: spec_of(t) for n, t in on_disk_form(module, _meta(part)).items()}} for part in plan]
    _check_parts(module, forms, {n: spec for part in plan for n, spec in part.items()})


def _check_parts(module: torch.nn.Module, parts: list[dict], specs: dict[str, TensorSpec]) -> dict[str, str]:
    """The index's weight map, once the parts (what each wrote) are checked against what a whole
    save of the tensors of `specs` writes: every name once, with its shape and dtype."""
    weight_map, written = {}, {}
    for i, part in enumerate(parts):
        for name, spec in part["specs"].items():
            if name in weight_map:  # two parts each wrote their half of one joined tensor
                raise RuntimeError(_MISMATCH.format(f"{name} written by parts {weight_map[name]} and "
                                                    f"{part_file_name(i, len(parts))}"))
            weight_map[name], written[name] = part_file_name(i, len(parts)), _plain(spec)
    expected = {name: _plain(spec_of(t)) for name, t in on_disk_form(module, _meta(specs)).items()}
    if written != expected:
        differ = sorted(n for n in expected.keys() | written.keys() if expected.get(n) != written.get(n))
        raise RuntimeError(_MISMATCH.format(f"{differ[:3]} differ: a whole save writes "
                                            f"{[expected.get(n) for n in differ[:3]]}, the parts "
                                            f"{[written.get(n) for n in differ[:3]]}"))
    return weight_map


def write_model_index(folder: Path, module: torch.nn.Module, parts: list[dict], specs: dict[str, TensorSpec]) -> None:
    """config.json (and generation_config.json), as save_pretrained writes them, and the index
    of the parts; `specs` (of every tensor the parts were given) says what the whole model's
    save would have written."""
    weight_map = _check_parts(module, parts, specs)
    module.config.dtype = str(module.dtype).split(".")[1]  # as save_pretrained records them
    module.config.architectures = [type(module).__name__]
    module.config.save_pretrained(str(folder))
    if module.can_generate():
        module.generation_config.save_pretrained(str(folder))
    index = {"metadata": {"total_parameters": sum(p["parameters"] for p in parts),
                          "total_size": sum(p["bytes"] for p in parts)},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json_files.dumps(index, indent=2) + "\n")
