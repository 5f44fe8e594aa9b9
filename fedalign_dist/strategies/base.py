"""The Strategy interface: one method per phase of a round. Strategies see named tensors
and a Communicator, never engines or torch.distributed."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from fedalign_dist.clients.routing_stats import StatsRequest
    from fedalign_dist.clients.state import ClientStore
    from fedalign_dist.comm import Communicator
    from fedalign_dist.config import Config
    from fedalign_dist.models.anatomy import MoEAnatomy

NamedTensors = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What one client's local training produced (stays on its rank until aggregation)."""
    client_id: int
    num_examples: int
    delta: NamedTensors
    """trained - start, for every federated trainable parameter."""
    train_loss: float
    stats: dict[str, Any] = field(default_factory=dict)
    """Routing statistics (usage, load, tokens, signature) when the strategy asks for them."""


_REGISTRY: dict[str, type["Strategy"]] = {}


def register(name: str) -> Callable[[type["Strategy"]], type["Strategy"]]:
    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def registered_strategies() -> list[str]:
    return sorted(_REGISTRY)


def build_strategy(config: "Config", anatomy: "MoEAnatomy | None" = None,
                   store: "ClientStore | None" = None) -> "Strategy":
    return _REGISTRY[config.strategy.name](config, anatomy, store)


class Strategy(ABC):
    name: str = ""

    def __init__(self, config: "Config", anatomy: "MoEAnatomy | None" = None,
                 store: "ClientStore | None" = None):
        self.config = config
        self.anatomy = anatomy
        """Which federated parameter is a router row block, an expert tensor, or other."""
        self.store = store
        """This rank's per-client state (personal weights live here, never in the global model)."""

    @property
    def stats_request(self) -> "StatsRequest | None":
        """Routing statistics each client computes after local training (None: none)."""
        return None

    @property
    def wants_router_probs(self) -> bool:
        """Whether the local loss needs the routers' probabilities (routing_regularizer)."""
        return False

    def routing_regularizer(self, router_probs: list[torch.Tensor]) -> torch.Tensor | None:
        """An extra local-loss term from each MoE layer's (tokens, E) routing probabilities."""
        return None

    def model_loss(self, model: torch.nn.Module) -> torch.Tensor | None:
        """An extra local-loss term the model itself recorded in its last forward (FedAMoLE's
        load balance); None for none."""
        return None

    def client_architecture(self, client_id: int) -> torch.Tensor | None:
        """Per-client architecture (FedAMoLE: which routed experts each adapted layer holds,
        (layers, E) bool); None: every client uses the whole model."""
        return None

    def client_start_state(self, client_id: int, global_state: NamedTensors,
                           store: "ClientStore") -> NamedTensors:
        """The weights a client starts its local training from (default: the global state)."""
        return global_state

    def local_regularizer(self, params: dict[str, torch.nn.Parameter],
                          start_state: NamedTensors) -> torch.Tensor | None:
        """An extra term for the local loss (FedProx); None for no term."""
        return None

    def after_local_training(self, client_id: int, trained_state: NamedTensors, store: "ClientStore") -> None:
        """Keep whatever per-client state the strategy needs (local-only: its weights)."""

    @abstractmethod
    def aggregate(self, global_state: NamedTensors, updates: list[ClientUpdate],
                  comm: "Communicator") -> tuple[NamedTensors, dict[str, float]]:
        """New global state from this rank's updates (collectives via comm); plus diagnostics.
        Every rank calls this every round, also with an empty update list."""

    def export_final(self, folder: Path, module: torch.nn.Module, global_state: NamedTensors) -> bool:
        """Write the final model in a format of the strategy's own into `folder` (FedAMoLE:
        adapters, every client's experts and the base); False: the default export."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
