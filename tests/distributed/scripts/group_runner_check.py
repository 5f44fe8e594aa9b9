"""Run under torchrun with 2 ranks as one client group of 2: each rank holds only its shard of
the global state (whole tensors, disjoint, together every federated tensor, about half the
elements each), before and after a FedAlign-MoE round, and the round's checkpoint is one file
per shard. argv[1]: the output folder."""
import sys

from fedalign_dist import run_lifecycle
from fedalign_dist.config import load_config
from fedalign_dist.data.federated import build_federated_data
from fedalign_dist.data.tokenizer import build_tokenizer
from fedalign_dist.distributed.collectives import all_gather_json
from fedalign_dist.distributed.env import end_checked_rank, init_distributed
from fedalign_dist.runner import Runner
from fedalign_dist.train import quiet_libraries

quiet_libraries()
cfg = load_config("configs/demo.yaml", [
    "data.max_examples=200", "data.max_length=48", "data.min_client_examples=5", "local.steps=2", "local.batch_size=4",
    "fed.num_clients=2", "fed.clients_per_round=2", "fed.rounds=1", "fed.ranks_per_client=2", "strategy.name=fedalign",
    "eval.global_examples=8", "checkpoint.every=1", f"run.output_dir={sys.argv[1]}", "run.name=r"])
env = init_distributed("gloo")
tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.model.path)
data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, tokenizer)
run_lifecycle.prepare(cfg)
runner = Runner(cfg, env, data, tokenizer)
shapes = runner.trainer.shapes()
held = sorted(runner.global_state)
records = runner.run(progress=False)
assert sorted(runner.global_state) == held, "the shard a rank holds changed in the round"
everyone = all_gather_json(held)
assert sorted(sum(everyone, [])) == sorted(shapes), "the shards are not disjoint or miss a tensor"
mine, total = (sum(shapes[n].numel() for n in names) for names in (held, shapes))
assert 0.3 < mine / total < 0.7, f"rank {env.rank} holds {mine} of {total} elements of the global state"
written = sorted(p.name for p in (cfg.run_dir / "checkpoints/round_00000").glob("global*"))
assert written == ["global.part000-of-002.safetensors", "global.part001-of-002.safetensors"], written
print(f"rank {env.rank} runner OK: holds {len(held)} of {len(shapes)} tensors, {mine / total:.2f} of the "
      f"elements; aligned fraction {records[-1]['aligned_fraction']}", flush=True)
end_checked_rank()  # not interpreter finalization, which can abort a passed rank
