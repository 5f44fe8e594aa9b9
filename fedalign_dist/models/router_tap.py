"""Watch a MoE model's own routing: forward hooks on every layer's router module record its
input (the hidden states the experts see), its logits, and the top-k indices and weights it
chose. In transformers 5.x every supported family's router returns
(router_logits, top_k_weights, top_k_indices) and every fused experts module is called as
experts(hidden_states, top_k_indices, top_k_weights), so one mechanism serves all families.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from fedalign_dist.models.families import Family
from fedalign_dist.models.routing import routing_distribution


@dataclass
class RouterRecord:
    hidden: torch.Tensor
    """(tokens, H) router input, padding included (flattened batch x sequence)."""
    logits: torch.Tensor
    """(tokens, E)"""
    weights: torch.Tensor
    """(tokens, k) the gate weights the model applied"""
    indices: torch.Tensor
    """(tokens, k) the experts it chose"""


def moe_modules(model: nn.Module, family: Family) -> dict[int, tuple[nn.Module, nn.Module]]:
    """{layer: (router module, experts module)}. With PEFT the outermost wrapper at each path
    is taken, so calling it applies the adapters."""
    found: dict[int, dict[str, nn.Module]] = {}
    router_re = re.compile(r"layers\.(\d+)\." + re.escape(family.router_module) + "$")
    experts_re = re.compile(r"layers\.(\d+)\.mlp\.experts$")
    for name, module in model.named_modules():
        for role, pattern in (("router", router_re), ("experts", experts_re)):
            match = pattern.search(name)
            if match:
                found.setdefault(int(match.group(1)), {}).setdefault(role, module)
    return {layer: (mods["router"], mods["experts"]) for layer, mods in sorted(found.items())
            if "router" in mods and "experts" in mods}


class RouterTap:
    """Context manager: while active, `records[layer]` holds the latest forward's routing."""

    def __init__(self, model: nn.Module, family: Family, keep_hidden: bool = False):
        self.modules = moe_modules(model, family)
        if not self.modules:
            raise ValueError(f"no MoE router found in the model for family '{family.name}'")
        self.family, self.keep_hidden = family, keep_hidden
        self.records: dict[int, RouterRecord] = {}
        self._handles = []

    @property
    def layers(self) -> list[int]:
        return list(self.modules)

    def experts(self, layer: int) -> nn.Module:
        return self.modules[layer][1]

    def __enter__(self) -> "RouterTap":
        for layer, (router, _) in self.modules.items():
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.records.clear()

    def _hook(self, layer: int):
        def record(module, args, output):
            logits, weights, indices = output[0], output[1], output[2]
            hidden = args[0].reshape(-1, args[0].shape[-1]) if self.keep_hidden else None
            self.records[layer] = RouterRecord(hidden, logits, weights, indices)
        return record

    def routing_probs(self, layer: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution the layer's router routed with (models/routing.py), per token:
        (tokens, E), the tokens where `keep` (flattened non-padding mask) is true."""
        logits = self.records[layer].logits
        probs = routing_distribution(self.family.routing, logits, self.modules[layer][0])
        return probs if keep is None else probs[keep]

    def router_probs(self, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the routing distribution over the non-padding tokens: (tokens, E)."""
        keep = attention_mask.reshape(-1).bool()
        return [self.routing_probs(layer, keep) for layer in self.layers]
