"""The client statistics pass and the routing regulariser, on real tiny models of every
supported MoE family."""
import pytest
import torch
import torch.nn.functional as F

from fedalign_dist.clients.routing_stats import StatsRequest, probe_batch, routing_statistics
from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.models.build import build_model
from fedalign_dist.models.families import FAMILIES
from fedalign_dist.models.router_tap import RouterTap

E, K = 4, 2
CPU = torch.device("cpu")


def _model(family="mixtral", finetune="full"):
    cfg = load_config(None, [f"model.family={family}", f"model.finetune={finetune}", f"model.num_experts={E}",
                             f"model.top_k={K}", "data.max_length=32"])
    return build_model(cfg, ByteTokenizer())


def _batches(num=2, seed=0, batch=3, width=10):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(3, 256, (batch, width), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding on the first row
        ids[0, :4] = 0
        out.append({"input_ids": ids, "attention_mask": mask,
                    "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)})
    return out


def _real_tokens(batches):
    return sum(int(b["attention_mask"].sum()) for b in batches)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["output", "input", "probe"])
def test_statistics_of_every_family(family, mode):
    model, anatomy = _model(family)
    batches = _batches()
    stats = routing_statistics(model, anatomy.family, E, batches, StatsRequest(2, mode), CPU,
                               probe_batch(256, 0))
    L = len(anatomy.layers())
    assert stats["usage"].shape == stats["load"].shape == stats["tokens"].shape == (L, E)
    torch.testing.assert_close(stats["usage"].sum(-1), torch.ones(L))
    torch.testing.assert_close(stats["load"].sum(-1), torch.ones(L))
    # every non-padding token picks K distinct experts; padding is not counted
    assert stats["tokens"].sum(-1).tolist() == [float(K * _real_tokens(batches))] * L
    assert stats["signature"].shape == (L, E, model.config.hidden_size)
    assert torch.isfinite(stats["signature"]).all()


def test_output_signature_is_gate_weighted_expert_output_by_hand():
    """Mixtral: recompute expert e's SwiGLU output from the fused weights directly."""
    model, anatomy = _model("mixtral")
    batches = _batches(1)
    stats = routing_statistics(model, anatomy.family, E, batches, StatsRequest(1, "output"), CPU)
    inputs = {}
    with RouterTap(model, anatomy.family, keep_hidden=True) as tap, torch.no_grad():
        model(**{k: v for k, v in batches[0].items()})
        inputs = {layer: tap.records[layer] for layer in tap.layers}
    keep = batches[0]["attention_mask"].reshape(-1).bool()
    layer = anatomy.layers()[1]
    rec = inputs[layer]
    experts = model.model.layers[layer].mlp.experts
    for e in range(E):
        chosen = rec.indices[keep] == e
        rows = chosen.any(-1)
        x = rec.hidden[keep][rows]
        gate_w = (rec.weights[keep] * chosen).sum(-1)[rows]
        g, u = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, experts.down_proj[e])
        expected = (gate_w[:, None] * y).sum(0) / gate_w.sum()
        torch.testing.assert_close(stats["signature"][1, e], expected.detach(), rtol=1e-4, atol=1e-6)
        assert stats["tokens"][1, e] == rows.sum()


def test_probe_signature_ignores_private_batches_and_projection_is_seeded():
    model, anatomy = _model("qwen2_moe")
    probe = probe_batch(256, seed=3)
    request = StatsRequest(1, "probe", signature_dim=8, seed=3)
    one = routing_statistics(model, anatomy.family, E, _batches(1, seed=1), request, CPU, probe)
    two = routing_statistics(model, anatomy.family, E, _batches(1, seed=2), request, CPU, probe)
    assert one["signature"].shape == (2, E, 8)
    torch.testing.assert_close(one["signature"], two["signature"])
    assert not torch.equal(one["usage"], two["usage"])
    other_seed = routing_statistics(model, anatomy.family, E, _batches(1, seed=1),
                                    StatsRequest(1, "probe", signature_dim=8, seed=4), CPU, probe_batch(256, 3))
    assert not torch.allclose(one["signature"], other_seed["signature"])


def test_lora_experts_go_through_the_adapter():
    """PEFT initialises lora_B to zero: the adapted experts' signatures equal the base model's;
    after moving lora_B they differ (so the adapter is really in the path)."""
    base, anatomy = _model("qwen3_moe", "full")
    lora, lora_anatomy = _model("qwen3_moe", "lora")
    request, batches = StatsRequest(1, "output"), _batches(1)
    plain = routing_statistics(base, anatomy.family, E, batches, request, CPU)
    adapted = routing_statistics(lora, lora_anatomy.family, E, batches, request, CPU)
    torch.testing.assert_close(plain["signature"], adapted["signature"], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if lora_anatomy.role(name).kind == "expert_lora_B":
                p.normal_(0, 0.5)
    moved = routing_statistics(lora, lora_anatomy.family, E, batches, request, CPU)
    assert not torch.allclose(plain["signature"], moved["signature"], rtol=1e-3, atol=1e-4)


def _kl_to_prior_after_training(mu: float) -> float:
    from fedalign_dist.aggregation.alignment import kl_divergence
    from fedalign_dist.strategies import build_strategy
    model, anatomy = _model("mixtral")
    cfg = load_config(None, ["strategy.name=fedalign", f"strategy.fedalign.mu={mu}", f"model.num_experts={E}"])
    strategy = build_strategy(cfg, anatomy)
    strategy.prior = torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85]])
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    torch.manual_seed(0)
    batches = _batches(8, seed=5)
    with RouterTap(model, anatomy.family) as tap:
        for batch in batches:
            out = model(**batch, labels=batch["input_ids"])
            reg = strategy.routing_regularizer(tap.router_probs(batch["attention_mask"]))
            loss = out.loss if reg is None else out.loss + reg
            optim.zero_grad()
            loss.backward()
            optim.step()
    usage = routing_statistics(model, anatomy.family, E, batches, StatsRequest(8), CPU)["usage"]
    return float(sum(kl_divergence(usage[li], strategy.prior[li]) for li in range(2)))


def test_routing_regulariser_pulls_routing_toward_the_prior():
    without = _kl_to_prior_after_training(0.0)
    with_reg = _kl_to_prior_after_training(1.0)
    assert with_reg < 0.5 * without, (with_reg, without)
