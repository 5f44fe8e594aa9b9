"""The Strategy interface: one method per phase of a round. Strategies see named tensors
and a Communicator, never engines or torch.distributed."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

if TYPE_CHECKING:
    from pydantic import BaseModel

    from fedalign_dist.clients.context import ClientContext
    from fedalign_dist.clients.routing_stats import StatsRequest
    from fedalign_dist.clients.state import ClientStore
    from fedalign_dist.config_sections import Config
    from fedalign_dist.distributed.communicator import Communicator
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
    own_delta: NamedTensors | None = None
    """Under privacy.enabled: the unclipped delta, for state that never leaves the client's rank
    (personal experts); None: `delta` itself."""
    keeps_state: bool = True
    """False for a client whose update was replaced by zeros (non-finite under DP): its personal
    state stays as it was."""


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


def strategy_class(name: str) -> type["Strategy"]:
    return _REGISTRY[name]


def strategy_sections() -> dict[str, type["BaseModel"]]:
    """{strategy name: its config section model} for the strategies that declare knobs."""
    return {name: cls.config_section for name, cls in sorted(_REGISTRY.items()) if cls.config_section is not None}


def build_strategy(config: "Config", anatomy: "MoEAnatomy | None" = None,
                   store: "ClientStore | None" = None) -> "Strategy":
    return _REGISTRY[config.strategy.name](config, anatomy, store)


class Strategy(ABC):
    """One federated method, owning every phase of a round. Client side (on the rank that
    hosts the client): build_model, client_start_state, prepare_client_model, the local loss
    terms, client_statistics, after_local_training. Server side (every rank, collectives
    through the Communicator): aggregate, prepare_global_model, export_final. Declared:
    config_section (its knobs, at strategy.<name>), model_kind, check_config."""
    name: str = ""
    config_section: "type[BaseModel] | None" = None
    """A pydantic model (subclass fedalign_dist.config.ConfigSection) of the strategy's knobs."""
    model_kind: Literal["moe", "dense", "any"] = "any"
    """The model the strategy needs: Mixture-of-Experts, dense (model.family=llama), or either."""
    judged_by: Literal["global", "personalized"] = "global"
    """Which model's evaluation measures the method (the benchmark's tuning and tables):
    personalized for a method whose global model never changes."""
    shares_updates: bool = True
    """Whether clients' updates leave them (local-only: no). Under privacy.enabled a strategy
    that shares them must implement max_client_weight."""
    shares_statistics: bool = False
    """Whether clients send statistics computed from their data with their update; under
    privacy.enabled they are bounded and noised (privacy/statistics.py)."""
    exports_own_format: bool = False
    """Whether export_final writes the final model (a format of its own) instead of the default
    export. Under client groups such a strategy is given a whole module, built on the run's
    first rank, with the global state loaded (its module elsewhere holds ZeRO-3 slices)."""
    runs_under_client_groups: bool = False
    """Whether the strategy is built for client groups (fed.ranks_per_client > 1): its client
    terms take batch-level means over the group's whole batch (clients/group_batch.py) and its
    aggregation runs on the global state by shard (distributed/sharded_aggregation.py)."""
    model_reveals_sample: bool = False
    """Whether the published model shows which clients a round sampled (FedAMoLE: only the
    experts a sampled client holds change, and the assignment is public); the accountant then
    counts no amplification by sampling."""

    @classmethod
    def check_config(cls, config: "Config") -> None:
        """Refuse combinations the strategy cannot run (ValueError with the fix)."""
        dense = config.model.family == "llama"
        if cls.model_kind == "dense" and not dense:
            raise ValueError(f"strategy.name={cls.name} needs a dense model: set model.family=llama "
                             f"(or model.path to a dense checkpoint)")
        if cls.model_kind == "moe" and dense:
            what = (f"model.path '{config.model.path}' is a dense (llama) checkpoint" if config.model.path
                    else "model.family=llama is a dense model")
            usable = [n for n, c in sorted(_REGISTRY.items()) if c.model_kind != "moe"]
            raise ValueError(f"{what}; strategy {cls.name} needs a Mixture-of-Experts model: give an MoE "
                             f"checkpoint, or use strategy.name={'|'.join(usable)}")
        group = config.fed.ranks_per_client
        if group > 1 and not cls.runs_under_client_groups:
            *most, last = [n for n, c in _REGISTRY.items() if c.runs_under_client_groups] or ["none"]
            built = f"{', '.join(most)} and {last} are" if most else f"{last} is"
            raise ValueError(f"fed.ranks_per_client={group} cannot run with strategy.name={cls.name} (not built for "
                             f"client groups: {built}). Set fed.ranks_per_client=1 for it")

    @classmethod
    def check_privacy(cls, config: "Config") -> None:
        """Under privacy.enabled: refuse the strategy's settings under which the stated guarantee
        would be false (ValueError with the fix); the checks every strategy shares are
        privacy/checks.py's."""

    @classmethod
    def build_model(cls, config: "Config", tokenizer) -> tuple[torch.nn.Module, "MoEAnatomy"]:
        """The model every client of this strategy trains (same seed: same weights on every rank)."""
        from fedalign_dist.models.build import build_model
        return build_model(config, tokenizer)

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

    def model_loss(self, model: torch.nn.Module, whole_batch) -> torch.Tensor | None:
        """An extra local-loss term the model itself recorded in its last forward (FedAMoLE's
        load balance); None for none. A term that is a function of means over the batch takes
        them over `whole_batch` (clients/group_batch.py: a client group's whole batch)."""
        return None

    def prepare_client_model(self, module: torch.nn.Module, client_id: int) -> None:
        """Shape the model for this client before its local training and personalised
        evaluation (FedAMoLE: the experts it holds); default: nothing."""

    def prepare_global_model(self, module: torch.nn.Module) -> None:
        """Shape the model for the global evaluation and the final export; default: nothing."""

    def client_statistics(self, module: torch.nn.Module, client: "ClientContext") -> dict[str, Any]:
        """What the client computes after local training and sends with its update (routing
        statistics, embeddings); default: nothing."""
        return {}

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

    def max_client_weight(self, global_state: NamedTensors, comm: "Communicator") -> dict[str, torch.Tensor | float]:
        """Per federated parameter, the largest weight any client's delta had in the last
        aggregate (a float or a tensor broadcastable to the parameter): privacy noise is scaled
        by it, so that a client moves any parameter block by at most its weight times C."""
        raise NotImplementedError(f"strategy {self.name} does not declare its clients' weights")

    def export_final(self, folder: Path, module: torch.nn.Module, global_state: NamedTensors) -> bool:
        """Write the final model in a format of the strategy's own into `folder` (FedAMoLE:
        adapters, every client's experts and the base); False: the default export."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
