"""The Strategy interface: one method per phase of a round. Strategies see named tensors
and a Communicator, never engines or torch.distributed."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from fedalign_dist.clients.state import ClientStore
    from fedalign_dist.comm import Communicator
    from fedalign_dist.config import Config

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


def build_strategy(config: "Config") -> "Strategy":
    return _REGISTRY[config.strategy.name](config)


class Strategy(ABC):
    name: str = ""

    def __init__(self, config: "Config"):
        self.config = config

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

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
