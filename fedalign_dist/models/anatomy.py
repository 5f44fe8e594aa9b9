"""MoE anatomy: for every parameter of a (possibly PEFT-wrapped) MoE model, what it is
(router row block, fused expert tensor, per-expert LoRA factor, or anything else), in
which layer, and how to take expert e out of it and put it back.

This is the only module that knows parameter names. Layouts (transformers 5.x):
  router weight (E, H), router bias (E,)            -> expert e is row / element e
  fused expert tensor (E, ...)                       -> expert e is [e]
  PEFT per-expert LoRA on a fused tensor (PEFT 0.21 `target_parameters`):
      lora_A (r*E, in)   read as (E, r, in)          -> expert e is rows [e*r:(e+1)*r]
      lora_B (out, r*E)  read as (out, r, E)         -> expert e is columns e, e+E, ..., e+(r-1)E
  (ParamWrapper.get_delta_weight; the B layout is strided, not blocked: tests/unit/test_anatomy.py
  checks both against PEFT's own per-expert delta)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fedalign_dist.models.families import Family

Kind = Literal["router", "expert", "expert_lora_A", "expert_lora_B", "other"]
_LAYER = re.compile(r"layers\.(\d+)\.")


def routing_groups(model_config) -> int:
    """How many groups of consecutive experts the router picks among first (DeepSeek-V3's
    n_group when topk_group < n_group; 1: none). Renumbering experts must keep each in its group."""
    groups = getattr(model_config, "n_group", None) or 1
    top = getattr(model_config, "topk_group", None)
    return 1 if top is not None and top >= groups else groups


@dataclass(frozen=True)
class ParamRole:
    kind: Kind
    layer: int | None = None
    source: str | None = None
    """For experts: the fused parameter name (gate_up_proj, down_proj, ...)."""
    lora_rank: int = 0


class MoEAnatomy:
    def __init__(self, model: nn.Module, family: Family, num_experts: int):
        self.family = family
        self.num_experts = num_experts
        self.routing_groups = routing_groups(getattr(model, "config", None))
        self.roles: dict[str, ParamRole] = {}
        lora_owner = self._lora_owners(model)
        router_tag = f".{family.router_module}."
        for name, param in model.named_parameters():
            layer_match = _LAYER.search(name)
            layer = int(layer_match.group(1)) if layer_match else None
            if name in lora_owner:
                source, factor = lora_owner[name]
                rank = param.shape[0] // num_experts if factor == "A" else param.shape[1] // num_experts
                self.roles[name] = ParamRole(f"expert_lora_{factor}", layer, source, rank)
            elif router_tag in name and name.rsplit(".", 1)[-1] in ("weight", "bias"):
                self.roles[name] = ParamRole("router", layer)
            elif ".mlp.experts." in name and name.rsplit(".", 1)[-1] in family.expert_params:
                self.roles[name] = ParamRole("expert", layer, name.rsplit(".", 1)[-1])
            else:
                self.roles[name] = ParamRole("other", layer)

    @staticmethod
    def _lora_owners(model: nn.Module) -> dict[str, tuple[str, str]]:
        """PEFT names nest per-parameter LoRA wrappers oddly; each wrapper's `parameter_name`
        says which fused tensor its lora_A / lora_B adapt."""
        owners = {}
        for mod_name, module in model.named_modules():
            source = getattr(module, "parameter_name", None)
            if source is None or not hasattr(module, "lora_A"):
                continue
            for factor in ("A", "B"):
                for sub_name, _ in getattr(module, f"lora_{factor}").named_parameters():
                    owners[f"{mod_name}.lora_{factor}.{sub_name}"] = (source, factor)
        return owners

    @classmethod
    def from_roles(cls, roles: dict[str, ParamRole], num_experts: int, family: Family | None = None) -> "MoEAnatomy":
        """An anatomy for models built here (e.g. AMoLE adapters), whose roles are known."""
        anatomy = cls.__new__(cls)
        anatomy.family, anatomy.num_experts, anatomy.roles = family, num_experts, dict(roles)
        anatomy.routing_groups = 1
        return anatomy

    def role(self, name: str) -> ParamRole:
        return self.roles[name]

    def names_of(self, *kinds: Kind, among=None) -> list[str]:
        names = self.roles if among is None else among
        return [n for n in names if self.roles[n].kind in kinds]

    def is_per_expert(self, name: str) -> bool:
        return self.roles[name].kind in ("router", "expert", "expert_lora_A", "expert_lora_B")

    def expert_slice(self, name: str, tensor: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert`'s part of `tensor` (a view where possible)."""
        role = self.roles[name]
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} outside [0, {self.num_experts})")
        if role.kind in ("router", "expert"):
            return tensor[expert]
        if role.kind == "expert_lora_A":
            return tensor[expert * role.lora_rank:(expert + 1) * role.lora_rank]
        if role.kind == "expert_lora_B":
            return tensor[:, expert::self.num_experts]
        raise ValueError(f"{name} is not a per-expert parameter")

    def put_expert(self, name: str, tensor: torch.Tensor, expert: int, value: torch.Tensor) -> None:
        """Write expert `expert`'s part of `tensor` in place."""
        self.expert_slice(name, tensor, expert).copy_(value)

    def expert_axis_weights(self, name: str, weights: torch.Tensor, ndim: int) -> torch.Tensor:
        """Per-expert weights (E,) shaped to broadcast over parameter `name` (ndim axes), so
        that expert e's part of the tensor is scaled by weights[e]."""
        role = self.roles[name]
        if role.kind in ("router", "expert"):
            return weights.reshape(-1, *([1] * (ndim - 1)))
        if role.kind == "expert_lora_A":
            return weights.repeat_interleave(role.lora_rank).reshape(-1, *([1] * (ndim - 1)))
        if role.kind == "expert_lora_B":
            return weights.repeat(role.lora_rank).reshape(1, -1)
        raise ValueError(f"{name} is not a per-expert parameter")

    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.roles.values() if r.kind in ("router", "expert")})
