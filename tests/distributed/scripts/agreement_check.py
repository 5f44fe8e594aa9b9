"""Run under torchrun with 2 ranks: ranks fail together, exchange data without pickle, and
apply rank 0's aggregation plan even where their own arithmetic would decide otherwise."""
import math
import time

import torch

from fedalign_dist.aggregation import alignment
from fedalign_dist.clients.state import MemoryClientStore
from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.distributed.agreement import PeerFailure, check_identical_on_all_ranks, on_coordinator
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.distributed.env import end_checked_rank, init_distributed
from fedalign_dist.distributed.placement import clients_of_rank
from fedalign_dist.models.build import build_model
from fedalign_dist.strategies import ClientUpdate, build_strategy
from fedalign_dist.strategies.expertwise import PERSONAL_KEY

env = init_distributed("gloo", timeout_s=600)
comm = Communicator(env.rank, env.world_size, env.device)

# 1. A failure on rank 0 alone reaches rank 1 at once (not after the 600 s timeout).
def fail():
    raise RuntimeError("boom on rank 0")

t0 = time.perf_counter()
try:
    on_coordinator("a test block", fail)
    outcome = "no error"
except PeerFailure as err:
    outcome = f"peer failure: {err}"
except RuntimeError as err:
    outcome = f"own error: {err}"
expected = "own error: boom on rank 0" if env.rank == 0 else "peer failure: rank 0 failed during a test block"
assert outcome.startswith(expected), outcome
assert time.perf_counter() - t0 < 30
print(f"rank {env.rank}: failure shared")

# 2. JSON and named-tensor rows cross ranks as tensors, ranks with no rows included.
got = comm.all_gather_json({"rank": env.rank, "x": [1.5, None, "s"]})
assert got == [{"rank": r, "x": [1.5, None, "s"]} for r in range(2)], got
items = [{"a": torch.full((2, 3), float(env.rank)), "held": torch.tensor([True, False])}] if env.rank == 1 else []
parts = comm.all_gather_tensor_items(items)
assert parts[0] == [] and len(parts[1]) == 1 and parts[1][0]["held"].dtype == torch.bool
assert torch.equal(parts[1][0]["a"], torch.ones(2, 3))
print(f"rank {env.rank}: rows gathered")

# 3. A state that differs in one bit on one rank is detected on every rank.
state = {"w": torch.ones(4)}
if env.rank == 1:
    state["w"][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one float32 ulp
try:
    check_identical_on_all_ranks(state, "test states")
    raise AssertionError("difference not detected")
except RuntimeError as err:
    assert "ranks hold different test states (rank 0: " in str(err), err
print(f"rank {env.rank}: difference detected")

# 4. Rank 1's selection decides differently (as a last-bit difference could): every rank
#    still applies rank 0's plan, so the result equals one process aggregating everything.
E, L, D, N = 4, 2, 16, 6
cfg = load_config(None, ["strategy.name=fedalign", f"model.num_experts={E}", "data.max_length=32",
                         f"fed.num_clients={N}", "strategy.fedalign.beta=0.5",
                         "strategy.fedalign.similarity_floor=1.0"])
model, anatomy = build_model(cfg, ByteTokenizer())
glob = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
gen = torch.Generator().manual_seed(7)
updates = []
for c in range(N):
    delta = {n: torch.randn(t.shape, generator=gen) for n, t in glob.items()}
    usage = torch.softmax(torch.randn(L, E, generator=gen), -1)
    stats = {"usage": usage, "load": usage.clone(), "tokens": torch.full((L, E), 10.0),
             "signature": torch.randn(L, E, D, generator=gen)}
    updates.append(ClientUpdate(c, 10 + 3 * c, delta, 0.0, stats))

reference_store = MemoryClientStore()
reference, _ = build_strategy(cfg, anatomy, reference_store).aggregate(glob, updates, Communicator(0, 1, env.device))
if env.rank == 1:
    original = alignment.centroid_selection
    def everyone_aligned(signatures, mass, active, beta, floor):
        return original(signatures, mass, active, math.inf, floor)
    alignment.centroid_selection = everyone_aligned
store = MemoryClientStore()
strategy = build_strategy(cfg, anatomy, store)
mine = [updates[c] for c in clients_of_rank(env.rank, N, env.world_size)]
new, _ = strategy.aggregate(glob, mine, comm)
for name in glob:
    torch.testing.assert_close(new[name], reference[name], rtol=1e-5, atol=1e-6)
for u in mine:
    expect = reference_store.get(u.client_id, PERSONAL_KEY) or {}
    have = store.get(u.client_id, PERSONAL_KEY) or {}
    assert expect.keys() == have.keys(), (u.client_id, sorted(expect)[:3], sorted(have)[:3])
assert any(reference_store.get(c, PERSONAL_KEY) for c in range(N)), "the test needs some unaligned experts"
print(f"rank {env.rank}: rank 0's plan applied")
end_checked_rank()  # not interpreter finalization, which can abort a passed rank
