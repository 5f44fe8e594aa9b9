"""Run under torchrun with 2 ranks (or 4 ranks and the argument 2: client groups of 2), for
memory and disk stores: personal state follows its client to the host (a rank, or every rank of
a client group) a round places it on, bit for bit, and leaves the host it came from; a group's
first rank sends for it."""
import sys
import tempfile

import torch

from fedalign_dist.clients.state import make_client_store
from fedalign_dist.clients.state_moves import StateHolders
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.distributed.env import end_checked_rank, init_distributed
from fedalign_dist.distributed.placement import clients_of_rank

env = init_distributed("gloo")
comm = Communicator(env.rank, env.world_size, env.device)
G = int(sys.argv[1]) if len(sys.argv) > 1 else 1
HOSTS, host = env.world_size // G, env.rank // G
assert HOSTS == 2
N = 6  # homes: clients 0-2 on host 0, 3-5 on host 1
sender = env.rank % G == 0


def entries(client):
    gen = torch.Generator().manual_seed(client)
    return {"personal": {"w|1": torch.randn(3, 4, generator=gen), "b|0": torch.randn(5, generator=gen).double()},
            "extra": {"n": torch.tensor([client])}} if client % 2 == 0 else {"personal": {"w|1": torch.ones(2)}}


def on(placement):
    """{client: host} as the runner passes it: {client: the host's first rank}."""
    return {c: h * G for c, h in placement.items()}


for kind in ("memory", "disk"):
    with tempfile.TemporaryDirectory() as root:
        store = make_client_store(kind, f"{root}/rank{env.rank}")
        for client in clients_of_rank(host, N, HOSTS):
            for key, tensors in entries(client).items():
                store.put(client, key, tensors)
        holders = StateHolders(N, env.world_size, G)
        placed = {0: 1, 1: 0, 3: 1, 4: 0, 5: 0}  # 0 and 4, 5 change host; 1 and 3 stay
        sent = holders.follow(on(placed), store, comm)
        assert (sent > 0) == sender  # each host sends one of its clients away, through its first rank
        mine = {c for c, h in placed.items() if h == host}
        home = set(clients_of_rank(host, N, HOSTS))
        expect = (home - {c for c, h in placed.items() if h != host}) | mine
        assert {c for c, _ in store.entries()} == expect, (kind, env.rank, store.entries())
        for client in expect:
            assert store.keys_of(client) == sorted(entries(client)), store.keys_of(client)
            for key, tensors in entries(client).items():
                got = store.get(client, key)
                assert got.keys() == tensors.keys()
                for name in tensors:
                    assert got[name].dtype == tensors[name].dtype and torch.equal(got[name], tensors[name])
        assert list(holders.holder) == [1, 0, 0, 1, 0, 0]
        assert holders.follow(on(placed), store, comm) == 0  # nothing left to move: no collective either
        holders.follow(on({0: 0, 2: 1}), store, comm)  # client 0 back home, 2 (entries) to host 1
        assert ({0} <= {c for c, _ in store.entries()}) == (host == 0)
        assert ({2} <= {c for c, _ in store.entries()}) == (host == 1)
        sent = holders.follow(on({0: 1}), store, comm)  # only host 0 has something to send
        assert (sent > 0) == (host == 0 and sender)
        assert ({0} <= {c for c, _ in store.entries()}) == (host == 1)
        print(f"rank {env.rank}: {kind} states followed their clients", flush=True)
end_checked_rank()  # not interpreter finalization, which can abort a passed rank
