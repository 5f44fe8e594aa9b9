"""FedAMoLE's final model on disk, and the loader that rebuilds it.

    final/amole/config.json              format, AMoLE sizes, adapted modules, base model
    final/amole/adapters.safetensors     the global adapters (shared + every routed expert + W_t)
    final/amole/assignment.safetensors   held (modules, E, clients): the experts each client
                                         holds in the final assignment (what it would get next)
    final/base_model/                    the frozen dense base, a plain Hugging Face checkpoint
                                         (only when the run built it; else config names model.path)

    from fedalign_dist.models.amole_io import load_fedamole
    model = load_fedamole("runs/NAME/final")             # the global model: every expert routable
    model = load_fedamole("runs/NAME/final", client=3)   # client 3's personalised architecture
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedalign_dist import json_files
from fedalign_dist.models.amole import AMoLELinear, amole_modules, set_held, wrap_linear_layers
from fedalign_dist.models.packaged import load_causal_lm

FORMAT = "fedalign_dist.fedamole/1"


@contextmanager
def plain_base(model: nn.Module):
    """The model with every AMoLE wrapper swapped back for its frozen linear layer."""
    wrapped = amole_modules(model)
    for name, module in wrapped.items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, module.base)
    try:
        yield model
    finally:
        for name, module in wrapped.items():
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, module)


def save_fedamole(folder: Path, model: nn.Module, adapters: dict[str, torch.Tensor], held: torch.Tensor,
                  target_modules: list[str], base_model_path: str | None) -> None:
    """adapters: the global state (names as in `model`); held: (modules, E, clients) bool."""
    wrapped = amole_modules(model)
    first: AMoLELinear = next(iter(wrapped.values()))
    out = folder / "amole"
    out.mkdir(parents=True)
    save_file({n: t.detach().float().contiguous().cpu() for n, t in adapters.items()},
              str(out / "adapters.safetensors"))
    save_file({"held": held.to(torch.uint8).contiguous()}, str(out / "assignment.safetensors"))
    if base_model_path is None:
        with plain_base(model) as base:
            base.save_pretrained(str(folder / "base_model"))
    meta = {"format": FORMAT, "target_modules": list(target_modules), "modules": list(wrapped),
            "num_experts": first.num_experts, "rank": first.rank, "alpha": first.scale * first.rank,
            "top_k": first.top_k, "num_clients": int(held.shape[-1]),
            "base_model": base_model_path}
    (out / "config.json").write_text(json_files.dumps(meta, indent=2) + "\n")


def load_fedamole(final_dir: str | Path, client: int | None = None) -> nn.Module:
    """The dense base with the run's AMoLE adapters, in eval mode. client=None: the global
    model (routes over every expert, as the run's global evaluation); client=c: client c's
    experts in the final assignment."""
    final = Path(final_dir)
    config_file = final / "amole" / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{final} has no amole/config.json: is it the final/ folder of a fedamole run?")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
    base = str(final / "base_model") if meta["base_model"] is None else meta["base_model"]
    model = load_causal_lm(base)
    for param in model.parameters():
        param.requires_grad_(False)
    wrap_linear_layers(model, meta["target_modules"], meta["num_experts"], meta["rank"], meta["alpha"],
                       meta["top_k"])
    if list(amole_modules(model)) != meta["modules"]:
        raise ValueError(f"the base model {base} does not have the adapted layers the run had")
    adapters = load_file(str(final / "amole" / "adapters.safetensors"))
    expected = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in meta["modules"]}
    missing, unexpected = sorted(expected - adapters.keys()), sorted(adapters.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{final}: adapters do not match the model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    model.load_state_dict(adapters, strict=False)
    held = load_file(str(final / "amole" / "assignment.safetensors"))["held"].bool()
    if client is not None and not 0 <= client < held.shape[-1]:
        raise IndexError(f"client {client} outside [0, {held.shape[-1]})")
    set_held(model, None if client is None else held[:, :, client])
    return model.eval()
