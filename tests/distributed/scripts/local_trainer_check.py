"""Run under torchrun with 2 ranks, with ZeRO stages as arguments (e.g. 0 1 2). For each stage:
every rank is an independent client (no gradient all-reduce, no weight broadcast), loading a
state into the live engine takes effect, and optimizer reset makes a client's local training
reproducible."""
import sys

import torch
import torch.distributed as dist

from fedalign_dist.clients.trainer import LocalTrainer, StepPath, client_batches
from fedalign_dist.config import load_config
from fedalign_dist.data.federated import build_federated_data
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.distributed.env import end_checked_rank, init_distributed
from fedalign_dist.models.build import build_model
from fedalign_dist.train import quiet_libraries


def check_stage(env, stage: int) -> None:
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "data.max_examples=300", "data.max_length=48",
                             "fed.num_clients=2", "fed.clients_per_round=2", "local.batch_size=4", "local.lr=0.01",
                             "data.min_client_examples=5"])
    tok = ByteTokenizer()
    data = build_federated_data(cfg.data, 2, 0, tok)
    model, _ = build_model(cfg, tok)
    trainer = LocalTrainer(model, cfg, env.device)
    start = trainer.read_state()

    def train_client(client_id):
        trainer.load_state(start)
        trainer.reset_optimizer()
        batches = client_batches(data, data.clients[client_id]["train"], 4, 4, 0, 0, client_id)
        trainer.train(batches, lambda m, b: (data.task.loss(m, b, 0.01),) * 2, lambda p: None)
        return trainer.read_state()

    first = train_client(env.rank)          # rank r trains client r
    second = train_client(env.rank)         # same client again from the same start
    for name in first:
        assert torch.equal(first[name], second[name]), f"stage {stage}: not reproducible after reset ({name})"
    assert any(not torch.equal(first[n], start[n]) for n in first), "training changed nothing"

    trainer.load_state(start)
    assert all(torch.equal(trainer.read_state()[n], start[n]) for n in start), "load_state did not take effect"

    # Independence: rank 1's client differs, so its weights must differ from rank 0's.
    flat = torch.cat([first[n].reshape(-1) for n in sorted(first)])
    gathered = [torch.zeros_like(flat) for _ in range(env.world_size)]
    dist.all_gather(gathered, flat)
    assert not torch.allclose(gathered[0], gathered[1]), "ranks were synchronised: they must train independently"
    # and rank 0 equals what a client-0 run gives when redone on rank 1 (placement-free training)
    if env.rank == 1:
        redo = train_client(0)
        flat0 = torch.cat([redo[n].reshape(-1) for n in sorted(redo)])
        torch.testing.assert_close(flat0, gathered[0], rtol=0, atol=0)

    if stage == 0:
        # ZeRO-0 in fp32 takes the lean step (no size-1 gradient all-reduce, torch's clipping):
        # bitwise the plain torch loop, AdamW and clip_grad_norm_ on the same batches
        assert trainer.path == StepPath(backward_allreduce=False, deepspeed_clipping=False)
        plain = {n: p for n, p in trainer.module.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for name, p in plain.items():
                p.copy_(start[name])
        optimizer = torch.optim.AdamW(plain.values(), lr=cfg.local.lr, weight_decay=cfg.local.weight_decay)
        trainer.module.train()
        for batch in client_batches(data, data.clients[env.rank]["train"], 4, 4, 0, 0, env.rank):
            optimizer.zero_grad(set_to_none=True)
            data.task.loss(trainer.module, batch, 0.01).backward()
            torch.nn.utils.clip_grad_norm_(plain.values(), cfg.local.grad_clip)
            optimizer.step()
        for name, p in plain.items():
            assert torch.equal(p.detach(), first[name]), f"lean step differs from plain torch ({name})"
    dist.barrier()
    print(f"rank {env.rank} stage {stage} OK")


quiet_libraries()
env = init_distributed("gloo")
for stage in map(int, sys.argv[1:]):  # one engine per stage, in one job
    check_stage(env, stage)
end_checked_rank()  # not interpreter finalization, which can abort a passed rank
