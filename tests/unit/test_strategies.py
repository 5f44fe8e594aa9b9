import pytest
import torch

from fedalign_dist.clients.state import DiskClientStore, MemoryClientStore
from fedalign_dist.config import load_config
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.strategies import ClientUpdate, build_strategy, registered_strategies


def _cfg(name, *extra):
    return load_config("configs/demo.yaml", [f"strategy.name={name}", *extra])


def test_registry_has_the_baselines():
    assert {"fedavg", "fedprox", "local"} <= set(registered_strategies())


def test_fedavg_one_process_is_the_weighted_average():
    strategy = build_strategy(_cfg("fedavg"))
    comm = Communicator(0, 1, torch.device("cpu"))
    glob = {"w": torch.tensor([1.0, 2.0])}
    ups = [ClientUpdate(0, 1, {"w": torch.tensor([1.0, 0.0])}, 0.0),
           ClientUpdate(1, 3, {"w": torch.tensor([-1.0, 4.0])}, 0.0)]
    new, _ = strategy.aggregate(glob, ups, comm)
    torch.testing.assert_close(new["w"], torch.tensor([1.0 + (1 - 3) / 4, 2.0 + 12 / 4]))


def test_fedprox_term_is_half_mu_squared_distance():
    strategy = build_strategy(_cfg("fedprox", "strategy.fedprox.mu=0.5"))
    params = {"w": torch.nn.Parameter(torch.tensor([3.0, 1.0]))}
    term = strategy.local_regularizer(params, {"w": torch.tensor([1.0, 1.0])})
    assert float(term) == pytest.approx(0.25 * 4.0)
    term.backward()
    torch.testing.assert_close(params["w"].grad, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("store_kind", ["memory", "disk"])
def test_local_only_keeps_each_clients_weights(store_kind, tmp_path):
    strategy = build_strategy(_cfg("local"))
    store = MemoryClientStore() if store_kind == "memory" else DiskClientStore(tmp_path)
    glob = {"w": torch.zeros(2)}
    assert strategy.client_start_state(5, glob, store) is glob
    strategy.after_local_training(5, {"w": torch.ones(2)}, store)
    torch.testing.assert_close(strategy.client_start_state(5, glob, store)["w"], torch.ones(2))
    new, _ = strategy.aggregate(glob, [ClientUpdate(5, 3, {"w": torch.ones(2)}, 0.0)],
                                Communicator(0, 1, torch.device("cpu")))
    assert new is glob
