"""Every supported MoE family, built offline from a tiny config: forward with router logits,
expert slice / put-back round trips on fused tensors and on per-expert LoRA."""
import pytest
import torch

from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.models.build import build_model
from fedalign_dist.models.families import FAMILIES

E = 4


def _model(family, finetune):
    cfg = load_config(None, [f"model.family={family}", f"model.finetune={finetune}", f"model.num_experts={E}",
                             "data.max_length=32"])
    return build_model(cfg, ByteTokenizer())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_returns_router_logits_per_layer(family):
    model, anatomy = _model(family, "full")
    ids = torch.randint(0, 256, (2, 12))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(out.loss)
    assert len(out.router_logits) == len(anatomy.layers()) == 2
    assert all(r.shape == (24, E) for r in out.router_logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_slice_put_back_round_trip(family, finetune):
    model, anatomy = _model(family, finetune)
    params = dict(model.named_parameters())
    per_expert = [n for n in params if anatomy.is_per_expert(n) and params[n].requires_grad]
    kinds = {anatomy.role(n).kind for n in per_expert}
    assert "router" in kinds
    assert kinds >= ({"expert"} if finetune == "full" else {"expert_lora_A", "expert_lora_B"})
    for name in per_expert:
        tensor = params[name].detach().clone()
        pieces = [anatomy.expert_slice(name, tensor, e).clone() for e in range(E)]
        rebuilt = torch.zeros_like(tensor)
        for e, piece in enumerate(pieces):
            anatomy.put_expert(name, rebuilt, e, piece)
        torch.testing.assert_close(rebuilt, tensor, rtol=0, atol=0)
        # writing expert 2 touches expert 2 only
        marked = tensor.clone()
        anatomy.put_expert(name, marked, 2, torch.full_like(pieces[2], 7.0))
        assert (anatomy.expert_slice(name, marked, 2) == 7.0).all()
        for e in (0, 1, 3):
            torch.testing.assert_close(anatomy.expert_slice(name, marked, e), pieces[e], rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_trains_routers_in_full_and_one_adapter_per_expert(family):
    model, anatomy = _model(family, "lora")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {anatomy.role(n).kind for n in trainable} == {"router", "expert_lora_A", "expert_lora_B"}
    routers = [p for n, p in trainable.items() if anatomy.role(n).kind == "router" and n.endswith("weight")]
    assert all(p.shape[0] == E for p in routers)
    # A LoRA update on expert 1 only changes the output of tokens routed to expert 1.
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        base = model(input_ids=ids, output_router_logits=True)
        name = next(n for n in trainable if anatomy.role(n).kind == "expert_lora_B")
        anatomy.put_expert(
            name, trainable[name].data, 1, torch.randn_like(anatomy.expert_slice(name, trainable[name], 1))
        )
        changed = model(input_ids=ids, output_router_logits=True)
    assert not torch.allclose(base.logits, changed.logits)


def test_qwen2_moe_lora_leaves_shared_expert_gate_frozen():
    model, anatomy = _model("qwen2_moe", "lora")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "shared_expert_gate" in n)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_expert_slices_are_the_experts_peft_applies(family):
    """Expert e's slices of lora_A and lora_B are exactly what PEFT multiplies into expert e:
    with only expert e's slices non-zero, PEFT's own delta is non-zero for expert e alone and
    equals scale * B_e A_e; the per-expert weights broadcast onto the same slices."""
    import peft
    model, anatomy = _model(family, "lora")
    params = dict(model.named_parameters())
    wrappers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.layer.ParamWrapper)]
    assert wrappers
    for module in wrappers:
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        a_name = next(n for n, p in params.items() if p is a)
        b_name = next(n for n, p in params.items() if p is b)
        for e in range(E):
            with torch.no_grad():
                a.zero_(), b.zero_()
                a_e, b_e = (
                    torch.randn_like(anatomy.expert_slice(a_name, a, e)),
                    torch.randn_like(anatomy.expert_slice(b_name, b, e)),
                )
                anatomy.put_expert(a_name, a.data, e, a_e)
                anatomy.put_expert(b_name, b.data, e, b_e)
                delta = module.get_delta_weight("default")
            assert [x for x in range(E) if delta[x].abs().sum() > 0] == [e]
            product = module.scaling["default"] * (b_e @ a_e)  # (out, in)
            expected = product if module._did_swap_in_out_features else product.T
            torch.testing.assert_close(delta[e], expected)
        for name, tensor in ((a_name, a), (b_name, b)):
            weights = torch.arange(1.0, E + 1)
            scaled = anatomy.expert_axis_weights(name, weights, tensor.ndim) * torch.ones_like(tensor)
            for e in range(E):
                assert (anatomy.expert_slice(name, scaled, e) == weights[e]).all()
