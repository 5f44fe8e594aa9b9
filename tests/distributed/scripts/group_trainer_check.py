"""Run under torchrun with 2 ranks: one client trained by a group of 2 ranks (ZeRO-3, each rank
holding half of every parameter and taking half of every batch) ends where the same client
trained on one rank ends, with and without FedProx's proximal term (each rank adds its
gradient on its own slices); loading a state writes only each rank's own slice; the whole model
is never moved to the device (each parameter is cut into slices one at a time); a state kept by
shard (each tensor on one rank) loads, reads back and trains exactly as a whole one; a PEFT
LoRA client trains as on one rank; a partner builds a preset's or a checkpoint's structure only,
and so may the first rank, reading a checkpoint into the slices."""
import tempfile
from contextlib import nullcontext

import torch

from fedalign_dist.aggregation.alignment import kl_divergence
from fedalign_dist.aggregation.shards import assign_shards
from fedalign_dist.clients.group_batch import GroupBatch
from fedalign_dist.clients.group_mpu import GroupMPU
from fedalign_dist.clients.trainer import LocalTrainer, client_batches
from fedalign_dist.clients.zero3_slices import slice_of
from fedalign_dist.config import load_config
from fedalign_dist.data.federated import build_federated_data
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.distributed.env import end_checked_rank, init_distributed
from fedalign_dist.models.build import build_model, structure_only
from fedalign_dist.models.checkpoint_by_part import loads_by_part
from fedalign_dist.models.families import family_of
from fedalign_dist.models.router_tap import RouterTap
from fedalign_dist.train import quiet_libraries

quiet_libraries()
env = init_distributed("gloo")
# the model's own losses on: the router's load-balancing loss and (FedAlign-MoE's) KL of the
# batch's mean routing are functions of means over the batch, which a group takes over its
# whole batch (clients/group_batch.py)
ROUTING_MU = 0.5
cfg = load_config(None, ["data.max_examples=300", "data.max_length=48", "fed.num_clients=2", "fed.clients_per_round=2",
                         "local.batch_size=4", "local.lr=0.01", "data.min_client_examples=5"])
tok = ByteTokenizer()
data = build_federated_data(cfg.data, 2, 0, tok)


def proximal(mu, reference):
    """FedProx's term: a sum over elements, so a group's ranks each take it on their slices."""
    return lambda params: 0.5 * mu * sum(((p - reference[n]) ** 2).sum() for n, p in params.items())


def objective(trainer, tap):
    """The task loss with the model's load-balancing loss, plus a KL of the batch's mean routing
    to uniform (FedAlign-MoE's regulariser), both over the group's whole batch."""
    whole = GroupBatch(trainer.group)

    def loss(model, batch):
        task = data.task.loss(model, batch, aux, whole.balance(model))
        routing = sum(kl_divergence(p.mean(0), torch.full_like(p[0], 1 / p.shape[1]))
                      for p in whole.router_probs(tap, batch["attention_mask"]))
        return task + whole.term(ROUTING_MU * routing), task
    return loss


def train(trainer, start, mu=0.0):
    trainer.load_state(start)
    trainer.reset_optimizer()
    batches = client_batches(data, data.clients[0]["train"], 3, 4, 0, 0, 0)
    regularizer = proximal(mu, trainer.regularizer_view(start)) if mu else (lambda p: None)
    with RouterTap(trainer.module, family_of("mixtral")) as tap:
        loss = trainer.train(batches, objective(trainer, tap), regularizer, data.task.targets_in)
    return trainer.read_state(), loss


solo = LocalTrainer(build_model(cfg, tok)[0], cfg, env.device)
aux = float(solo.module.config.router_aux_loss_coef)
assert aux > 0, "the preset's load-balancing loss is off: the check would not cover it"
start = solo.read_state()
alone, _ = train(solo, start)
# mu = 20: large enough that the proximal pull changes the third step's weights measurably
MU = 20.0
alone_prox, _ = train(solo, start, MU)

model = build_model(cfg, tok)[0]
moves = []  # a whole-model move to the device (what a group must avoid) would show here
whole_move = model.to
model.to = lambda *args, **kwargs: (moves.append(args), whole_move(*args, **kwargs))[1]
group = LocalTrainer(model, cfg, env.device, group=GroupMPU(2))
assert not moves, f"the whole model was moved to the device before ZeRO-3 partitioned it: {moves}"
held = sum(p.ds_tensor.numel() for p in group.params.values())
total = sum(t.numel() for t in start.values())
assert held <= total / 2 + 64 * len(start), f"rank {env.rank} holds {held} of {total} elements"
opt = group.engine.optimizer  # fp32: the masters are the parameters' slices, not a second copy
assert all(m.data_ptr() == p.data_ptr() for p, m in zip(opt.fp16_partitioned_groups_flat,
                                                         opt.fp32_partitioned_groups_flat)), "fp32 masters copied"
together, _ = train(group, start)
worst = max(float((together[n] - alone[n]).abs().max()) for n in alone)
assert any(not torch.equal(alone[n], start[n]) for n in start), "training changed nothing"
# measured: 2 of 65,536 expert elements 2.6e-5 apart, the rest within 1e-5 (AdamW's first steps
# flip near-zero gradients' last bits into lr-sized moves); with the batch-level terms taken on
# each rank's half instead, 13 % of the embeddings' elements were up to 4.4e-2 apart
apart = sum(int(((together[n] - alone[n]).abs() > 1e-5).sum()) for n in alone) / total
assert apart < 1e-4, f"{apart:.3g} of the elements are more than 1e-5 apart"
for name in alone:
    torch.testing.assert_close(together[name], alone[name], rtol=0, atol=1e-4,
                               msg=lambda why, name=name: f"{name} differs: {why}")
together_prox, _ = train(group, start, MU)
pull = max(float((alone_prox[n] - alone[n]).abs().max()) for n in alone)
assert pull > 1e-4, f"the proximal term moved nothing ({pull:.3g})"
# The pull nearly cancels the task gradient at some elements, where AdamW's early steps (about lr
# x sign) then flip on last-bit differences: measured up to 1.5e-5 against a pull of 0.036; a
# group that dropped the term would differ by the whole pull.
for name in alone:
    torch.testing.assert_close(together_prox[name], alone_prox[name], rtol=0, atol=1e-4,
                               msg=f"{name} differs with the proximal term")

# an evaluation leaves parameters gathered (whole): a load after it must still take effect
data.task.evaluate_sums(group.module, data.examples_at(data.clients[1]["test"][:8]), 8, env.device)
shifted = {n: t + 0.5 for n, t in start.items()}
group.load_state(shifted)
back = group.read_state()
assert all(torch.equal(back[n], shifted[n]) for n in shifted), "load_state did not write every slice"
# and the forward pass computes with it (not with a stale whole copy of a small parameter)
solo.load_state(shifted)
probe = next(client_batches(data, data.clients[1]["train"], 1, 4, 0, 0, 1))
with torch.no_grad():
    for trainer in (solo, group):
        trainer.module.eval()
    want, got = (data.task.loss(t.engine, probe, 0.0) for t in (solo, group))
assert abs(float(want) - float(got)) < 1e-5 * abs(float(want)), f"forward after load: {float(got)} != {float(want)}"
# the global state kept by shard (aggregation/shards.py): a rank holds its own tensors only; loading
# scatters each tensor's slices from its owner, reading gathers each whole tensor on its owner only
owner = assign_shards({n: t.numel() for n, t in start.items()}, 2)
rank_in_group = GroupMPU(2).group_rank
assert 0 < sum(p == rank_in_group for p in owner.values()) < len(owner)
own = lambda state: {n: t for n, t in state.items() if owner[n] == rank_in_group}  # noqa: E731
group.load_state(own(shifted), owner)
back = group.read_state(owner)
assert back.keys() == own(shifted).keys(), "a rank got tensors it does not own"
assert all(torch.equal(back[n], shifted[n]) for n in back), "a shard did not load or read back exactly"
assert all(torch.equal(t, shifted[n]) for n, t in group.read_state().items()), "a slice was not written"
reference = group.regularizer_view(own(shifted))
assert all(torch.equal(reference[n], slice_of(shifted[n], p, rank_in_group)) for n, p in group.params.items())
group.load_state(own(start), owner)  # the same client from a start kept by shard ends where it did
group.reset_optimizer()
with RouterTap(group.module, family_of("mixtral")) as tap:
    group.train(client_batches(data, data.clients[0]["train"], 3, 4, 0, 0, 0), objective(group, tap),
                lambda p: None, data.task.targets_in)
assert all(torch.equal(t, together[n]) for n, t in group.read_state(owner).items()), "training from shards differs"
# a group's other ranks may build the structure only (parameters on the meta device): ZeRO-3 fills
# every rank's slices with the first rank's values, so the whole model is on one rank's host only
with structure_only(cfg) if rank_in_group else nullcontext():
    outline = build_model(cfg, tok)[0]
assert all(p.is_meta for p in outline.parameters()) == bool(rank_in_group), "the structure-only build has weights"
light = LocalTrainer(outline, cfg, env.device, group=GroupMPU(2))
assert all(torch.equal(t, start[n]) for n, t in light.read_state().items()), "a partner's slices differ"
# so may they from a checkpoint (model.path, read for its config alone): this one ties its output
# embeddings, which transformers leaves untied when it builds on the meta device, and a partner
# holding one parameter more waited forever in ZeRO-3's partitioning
pretrained = load_config(None, ["model.path=package:public-moe-8x2", "model.num_experts=8",
                                "data.max_length=48", "model.router_aux_loss_coef=0"])
loaded = build_model(pretrained, tok)[0]
assert loaded.config.tie_word_embeddings, "the packaged base no longer ties its embeddings: pick one that does"
with structure_only(pretrained) if rank_in_group else nullcontext():
    outline = build_model(pretrained, tok)[0]
assert all(p.is_meta for p in outline.parameters()) == bool(rank_in_group), "the checkpoint's structure has weights"
assert [n for n, _ in outline.named_parameters()] == [n for n, _ in loaded.named_parameters()]
want = {n: p.detach().clone() for n, p in loaded.named_parameters()}
from_checkpoint = LocalTrainer(outline, pretrained, env.device, group=GroupMPU(2)).read_state()
assert from_checkpoint.keys() == want.keys()
assert all(torch.equal(t, want[n]) for n, t in from_checkpoint.items()), "a partner's checkpoint slices differ"


def read_by_part(config):
    """Both ranks build the structure only; the group's first rank reads the checkpoint into the
    slices (models/checkpoint_by_part.py), so no host holds the whole model."""
    grouped = config.model_copy(update={"fed": config.fed.model_copy(update={"ranks_per_client": 2})})
    assert loads_by_part(grouped), f"{config.model.path} is not read by part"
    with structure_only(config):
        outline = build_model(config, tok)[0]
    assert all(p.is_meta for p in outline.parameters()), "the structure-only build has weights"
    return LocalTrainer(outline, config, env.device, group=GroupMPU(2), checkpoint=config.model.path)


# the packaged checkpoint: per-expert tensors on disk, fused by transformers' conversions; tied embeddings
by_part = read_by_part(pretrained).read_state()
assert by_part.keys() == want.keys()
assert all(torch.equal(t, want[n]) for n, t in by_part.items()), "a checkpoint read by part differs from a whole load"
# another family (DeepSeek-V3: shared experts, a persistent buffer), saved with every buffer drawn
# at random so that a buffer not read from the file would show
folder = [tempfile.mkdtemp(prefix="by_part_") if env.rank == 0 else None]
torch.distributed.broadcast_object_list(folder, src=0)
deepseek = cfg.model_copy(update={"model": cfg.model.model_copy(update={"family": "deepseek_v3"})})
if env.rank == 0:
    saved = build_model(deepseek, tok)[0]
    persistent = saved.state_dict().keys() - dict(saved.named_parameters()).keys()
    assert persistent, "DeepSeek-V3 has no persistent buffer any more: pick a family that has one"
    for name, buffer in saved.named_buffers():
        if name in persistent:
            buffer.uniform_(-1, 1)
    saved.save_pretrained(folder[0])
torch.distributed.barrier()
deepseek = deepseek.model_copy(update={"model": deepseek.model.model_copy(update={"path": folder[0]})})
whole = build_model(deepseek, tok)[0]
expected = whole.state_dict()
read = read_by_part(deepseek)
for name, value in read.read_state().items():
    assert torch.equal(value, expected[name].float()), f"DeepSeek-V3's {name} read by part differs"
buffers = dict(read.module.named_buffers())
for name in expected.keys() - dict(whole.named_parameters()).keys():
    assert torch.equal(buffers[name].cpu(), expected[name]), f"DeepSeek-V3's buffer {name} read by part differs"
# PEFT LoRA on the fused expert tensors (a parametrization applied inside the experts' forward) and
# on the router (modules_to_save): one client trained by the group, its partner built as structure
# only, ends where one rank ends (DeepSpeed's default MoE leaf modules reduced the router's
# gradient before it existed: "0 != 256 Cannot reduce scatter gradients")
lora_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"finetune": "lora"})})
lora_solo = LocalTrainer(build_model(lora_cfg, tok)[0], lora_cfg, env.device)
lora_start = lora_solo.read_state()
assert any("lora_B" in n for n in lora_start) and all("lora_" in n or "modules_to_save" in n for n in lora_start)
lora_alone, _ = train(lora_solo, lora_start)
with structure_only(lora_cfg) if rank_in_group else nullcontext():
    lora_model = build_model(lora_cfg, tok)[0]
lora_group = LocalTrainer(lora_model, lora_cfg, env.device, group=GroupMPU(2))
assert all(torch.equal(t, lora_start[n]) for n, t in lora_group.read_state().items()), "a partner's LoRA differs"
lora_together, _ = train(lora_group, lora_start)
assert all(not torch.equal(lora_alone[n], lora_start[n]) for n in lora_start if "lora_B" in n), "LoRA B did not train"
lora_worst = max(float((lora_together[n] - lora_alone[n]).abs().max()) for n in lora_alone)
for name in lora_alone:  # measured: 2.2e-7
    torch.testing.assert_close(lora_together[name], lora_alone[name], rtol=1e-5, atol=1e-5, msg=f"LoRA {name} differs")
try:
    GroupMPU(3)
    raise AssertionError("a group of 3 in a world of 2 was accepted")
except ValueError as err:
    assert "do not divide a world of 2" in str(err)
print(
    f"rank {env.rank} group of 2 OK: holds {held} of {total} elements; largest difference from one rank {worst:.3g}; "
    f"with the proximal term (pull {pull:.3g}) "
    f"{max(float((together_prox[n] - alone_prox[n]).abs().max()) for n in alone):.3g}; "
    f"LoRA {lora_worst:.3g}"
)
end_checked_rank()  # not interpreter finalization, which can abort a passed rank
