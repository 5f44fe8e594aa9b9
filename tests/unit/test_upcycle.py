"""Sparse upcycling keeps the dense model's function: with zero routers every token's top-k
gates are equal, and every expert is the dense MLP."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedalign_dist.pretrain.upcycle import upcycle


@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 1)])
def test_upcycled_moe_computes_the_dense_models_logits(experts, top_k):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    moe = upcycle(dense, experts, top_k).eval()
    assert moe.config.num_local_experts == experts and moe.config.num_experts_per_tok == top_k
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=x).logits, dense(input_ids=x).logits, rtol=0, atol=1e-6)
    # the experts are trainable copies, not shared tensors
    experts_param = moe.model.layers[0].mlp.experts.gate_up_proj
    assert (
        experts_param.shape[0] == experts
        and experts_param.data_ptr() != dense.model.layers[0].mlp.gate_proj.weight.data_ptr()
    )


def test_a_model_with_biases_is_refused():
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, attention_bias=True))
    with pytest.raises(ValueError, match="biases"):
        upcycle(dense, 4, 2)


def test_perturbed_copies_differ_slightly_and_reproducibly():
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    moe, again = (upcycle(dense, 4, 2, perturb=0.01, seed=3).eval() for _ in range(2))
    other_seed = upcycle(dense, 4, 2, perturb=0.01, seed=4)
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    copy = torch.cat([dense.model.layers[0].mlp.gate_proj.weight, dense.model.layers[0].mlp.up_proj.weight])
    relative = [float((experts[e] - copy).pow(2).mean().sqrt() / copy.pow(2).mean().sqrt()) for e in range(4)]
    assert all(0.008 < r < 0.012 for r in relative), relative
    assert not torch.equal(experts[0], experts[1]) and moe.model.layers[0].mlp.gate.weight.abs().sum() > 0
    assert torch.equal(experts, again.model.layers[0].mlp.experts.gate_up_proj)
    assert not torch.equal(experts, other_seed.model.layers[0].mlp.experts.gate_up_proj)
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():  # close to the dense model's function, not equal
        diff = (moe(input_ids=x).logits - dense(input_ids=x).logits).abs().max()
    assert 1e-6 < diff < 0.1
