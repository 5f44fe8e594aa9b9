"""Sparse upcycling: a dense Llama-architecture decoder (e.g. SmolLM2-135M) becomes a
Mixtral-style MoE whose experts are all copies of the dense MLP and whose routers are zero.
With equal router logits every token's top-k gates are 1/k each, so the MoE computes the
dense model's function: the same logits and perplexity, and the experts differentiate from
there during fine-tuning (the GPU-scale base of the benchmark).

    fedalign-dist upcycle --dense package:smollm2-135m-instruct --experts 4 --out DIR
"""
from __future__ import annotations

import torch


def upcycled_config(dense_config, experts: int, top_k: int):
    from transformers import MixtralConfig
    c = dense_config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("upcycling needs a decoder without attention or MLP biases (Mixtral has none)")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts]: got top_k={top_k}, experts={experts}")
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=top_k, router_aux_loss_coef=0.01)


@torch.no_grad()
def upcycle(
    dense: torch.nn.Module, experts: int, top_k: int = 2, perturb: float = 0.0, seed: int = 0
) -> torch.nn.Module:
    """The MoE copy of `dense` (a LlamaForCausalLM): attention, norms and embeddings copied,
    every expert a copy of the layer's MLP (fused gate_up / down), routers zero. With
    `perturb` > 0 the copies and the routers are nudged apart (seeded): each expert tensor gets
    Gaussian noise of `perturb` times its RMS, each router row noise of `perturb` times the
    expected logit scale 1/sqrt(hidden), so tokens spread over the experts from the start
    and each client's data breaks the remaining symmetry its own way."""
    from transformers import MixtralForCausalLM
    moe = MixtralForCausalLM(upcycled_config(dense.config, experts, top_k)).to(dense.dtype)
    source = dense.state_dict()
    target = moe.state_dict()
    for name, value in source.items():
        if ".mlp." not in name and name in target:
            target[name].copy_(value)
    for i, layer in enumerate(moe.model.layers):
        mlp = dense.model.layers[i].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # gate rows first, then up
        layer.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, *gate_up.shape))
        layer.mlp.experts.down_proj.copy_(mlp.down_proj.weight.expand(experts, *mlp.down_proj.weight.shape))
        layer.mlp.gate.weight.zero_()
    if perturb > 0:
        gen = torch.Generator().manual_seed(seed)
        for layer in moe.model.layers:
            for tensor in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                rms = tensor[0].pow(2).mean().sqrt()
                tensor.add_(perturb * rms * torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype))
            gate = layer.mlp.gate.weight
            gate.add_(perturb * torch.randn(gate.shape, generator=gen, dtype=gate.dtype) / gate.shape[1] ** 0.5)
    missing = [n for n in target if ".mlp." not in n and n not in source and not n.endswith("lm_head.weight")]
    if missing:
        raise ValueError(f"the dense model has no weights for {missing[:3]}: is it a Llama-architecture decoder?")
    return moe
