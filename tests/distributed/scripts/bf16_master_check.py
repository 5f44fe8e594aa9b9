"""Run under torchrun (1 rank) with ZeRO stages as arguments (e.g. 0 2). For each: under
deepspeed.bf16 the state a client reads back keeps updates smaller than one bf16 step (lr
1e-6: ~1e-6 per Adam step, while one bf16 step near |w| = 0.02 is ~1e-4), and a loaded state
is read back exactly."""
import sys

import torch

from fedalign_dist.clients.trainer import LocalTrainer
from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.distributed.env import end_checked_rank, init_distributed
from fedalign_dist.models.build import build_model


def check_stage(env, stage: int) -> None:
    cfg = load_config("configs/demo.yaml", ["deepspeed.bf16=true", f"deepspeed.zero_stage={stage}", "local.lr=1e-6",
                                            "data.max_length=32"])
    model, _ = build_model(cfg, ByteTokenizer())
    trainer = LocalTrainer(model, cfg, env.device)
    assert next(iter(trainer.params.values())).dtype == torch.bfloat16
    start = trainer.read_state()
    gen = torch.Generator().manual_seed(0)

    def batches(k):
        for _ in range(k):
            ids = torch.randint(0, 250, (4, 32), generator=gen)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def loss(model, batch):
        out = model(**batch)
        return out.loss, out.loss

    trainer.train(batches(3), loss, lambda params: None)
    end = trainer.read_state()
    moved = sum(int((end[n] != start[n]).sum()) for n in start) / sum(t.numel() for t in start.values())
    assert moved > 0.9, f"only {moved:.3f} of the weights moved: updates were rounded away"
    shifted = {n: t + 1e-6 for n, t in end.items()}  # far below one bf16 step
    trainer.load_state(shifted)
    again = trainer.read_state()
    assert all(torch.equal(again[n], shifted[n]) for n in shifted), "a loaded fp32 state did not read back exactly"
    print(f"stage {stage}: {moved:.3f} of the weights moved; fp32 state round-trips exactly")


env = init_distributed("gloo")
for stage in map(int, sys.argv[1:]):
    check_stage(env, stage)
end_checked_rank()  # not interpreter finalization, which can abort a passed rank
