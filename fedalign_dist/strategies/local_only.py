"""Local-only training: no aggregation; each client keeps training its own weights
(the personalisation floor). The global state stays the initial model."""
from __future__ import annotations

from fedalign_dist.strategies.base import ClientUpdate, NamedTensors, Strategy, register

_KEY = "local_weights"


@register("local")
class LocalOnly(Strategy):
    judged_by = "personalized"  # its global model is the initial one
    shares_updates = False  # nothing leaves a client: epsilon 0 under privacy.enabled

    def client_start_state(self, client_id, global_state, store):
        own = store.get(client_id, _KEY)
        return own if own is not None else global_state

    def after_local_training(self, client_id, trained_state, store):
        store.put(client_id, _KEY, {n: t.clone() for n, t in trained_state.items()})

    def aggregate(self, global_state: NamedTensors, updates: list[ClientUpdate], comm):
        return global_state, {}
