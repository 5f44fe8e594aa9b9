"""Federated strategies, chosen by name from a registry (never an if-chain)."""
from fedalign_dist.strategies.base import ClientUpdate, Strategy, build_strategy, register, registered_strategies

# Importing the modules registers their strategies.
from fedalign_dist.strategies import fedalign, fedamole, fedavg, fedmoe, fedprox, local_only  # noqa: E402,F401

__all__ = ["ClientUpdate", "Strategy", "build_strategy", "register", "registered_strategies"]
