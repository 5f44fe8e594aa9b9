"""Run under torchrun with 2 ranks, for memory and disk stores: personal state follows its
client to the rank a round places it on, bit for bit, and leaves the rank it came from."""
import sys
import tempfile

import torch

from fedalign_dist.clients.state import make_client_store
from fedalign_dist.clients.state_moves import StateHolders
from fedalign_dist.dist.communicator import Communicator
from fedalign_dist.dist.env import init_distributed
from fedalign_dist.dist.placement import clients_of_rank

env = init_distributed("gloo")
comm = Communicator(env.rank, env.world_size, env.device)
N = 6  # homes: clients 0-2 on rank 0, 3-5 on rank 1


def entries(client):
    gen = torch.Generator().manual_seed(client)
    return {"personal": {"w|1": torch.randn(3, 4, generator=gen), "b|0": torch.randn(5, generator=gen).double()},
            "extra": {"n": torch.tensor([client])}} if client % 2 == 0 else {"personal": {"w|1": torch.ones(2)}}


for kind in ("memory", "disk"):
    with tempfile.TemporaryDirectory() as root:
        store = make_client_store(kind, f"{root}/rank{env.rank}")
        for client in clients_of_rank(env.rank, N, env.world_size):
            for key, tensors in entries(client).items():
                store.put(client, key, tensors)
        holders = StateHolders(N, env.world_size)
        hosts = {0: 1, 1: 0, 3: 1, 4: 0, 5: 0}  # 0 and 4, 5 change rank; 1 and 3 stay
        sent = holders.follow(hosts, store, comm)
        assert sent > 0  # each rank sends one of its clients away
        mine = {c for c, r in hosts.items() if r == env.rank}
        home = set(clients_of_rank(env.rank, N, env.world_size))
        expect = (home - {c for c, r in hosts.items() if r != env.rank}) | mine
        assert {c for c, _ in store.entries()} == expect, (kind, env.rank, store.entries())
        for client in expect:
            assert store.keys_of(client) == sorted(entries(client)), store.keys_of(client)
            for key, tensors in entries(client).items():
                got = store.get(client, key)
                assert got.keys() == tensors.keys()
                for name in tensors:
                    assert got[name].dtype == tensors[name].dtype and torch.equal(got[name], tensors[name])
        assert list(holders.holder) == [1, 0, 0, 1, 0, 0]
        assert holders.follow(hosts, store, comm) == 0  # nothing left to move: no collective either
        holders.follow({0: 0, 2: 1}, store, comm)  # client 0 back home, 2 (entries) to rank 1
        assert ({0} <= {c for c, _ in store.entries()}) == (env.rank == 0)
        assert ({2} <= {c for c, _ in store.entries()}) == (env.rank == 1)
        sent = holders.follow({0: 1}, store, comm)  # only rank 0 has something to send
        assert (sent > 0) == (env.rank == 0)
        assert ({0} <= {c for c, _ in store.entries()}) == (env.rank == 1)
        print(f"rank {env.rank}: {kind} states followed their clients", flush=True)
