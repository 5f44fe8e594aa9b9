"""Federated strategies, chosen by name from a registry (never an if-chain)."""
# Importing the modules registers their strategies.
from fedalign_dist.strategies import fedalign, fedamole, fedavg, fedmoe, fedprox, local_only  # noqa: E402,F401
from fedalign_dist.strategies.base import (
    ClientUpdate,
    Strategy,
    build_strategy,
    register,
    registered_strategies,
    strategy_class,
    strategy_sections,
)


def build_run_model(config, tokenizer):
    """(model, anatomy) as the configured strategy trains it."""
    return strategy_class(config.strategy.name).build_model(config, tokenizer)


__all__ = ["ClientUpdate", "Strategy", "build_run_model", "build_strategy", "register", "registered_strategies",
           "strategy_class", "strategy_sections"]
