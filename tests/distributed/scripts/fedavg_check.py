"""Run under torchrun with 2 ranks: FedAvg through a real all_reduce equals the weighted
average computed by hand over every client's delta."""
import torch

from fedalign_dist.config import load_config
from fedalign_dist.distributed.communicator import Communicator
from fedalign_dist.distributed.env import end_checked_rank, init_distributed
from fedalign_dist.distributed.placement import clients_of_rank
from fedalign_dist.strategies import ClientUpdate, build_strategy

env = init_distributed("gloo")
num_clients = 5
gen = torch.Generator().manual_seed(42)
glob = {"router": torch.randn(4, 8, generator=gen), "experts": torch.randn(4, 6, 8, generator=gen)}
deltas = [{k: torch.randn(v.shape, generator=gen) for k, v in glob.items()} for _ in range(num_clients)]
examples = [11, 3, 7, 20, 1]

mine = clients_of_rank(env.rank, num_clients, env.world_size)
updates = [ClientUpdate(c, examples[c], deltas[c], 0.0) for c in mine]
strategy = build_strategy(load_config(None, ["strategy.name=fedavg", f"fed.num_clients={num_clients}"]))
comm = Communicator(env.rank, env.world_size, env.device)
new, _ = strategy.aggregate(glob, updates, comm)

total = sum(examples)
for name in glob:
    by_hand = glob[name] + sum(examples[c] * deltas[c][name] for c in range(num_clients)) / total
    torch.testing.assert_close(new[name], by_hand, rtol=1e-6, atol=1e-6)
numel = sum(v.numel() for v in glob.values()) + 1
assert comm.bytes.sent == comm.bytes.received == 2 * (env.world_size - 1) * numel * 4 // env.world_size
print(f"rank {env.rank}: hosts {mine}, FedAvg equals the hand-computed average")
end_checked_rank()  # not interpreter finalization, which can abort a passed rank
