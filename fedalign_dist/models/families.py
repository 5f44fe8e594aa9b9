"""Per-family facts about transformers 5.x MoE causal LMs: how to build a config offline,
where the router sits, and which fused expert tensors exist (expert axis 0 in all of them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import transformers as tf

from fedalign_dist.models.routing import RoutingKind


@dataclass(frozen=True)
class Family:
    name: str
    router_module: str
    """Path of the router inside a decoder layer (a bare-weight TopKRouter, not nn.Linear)."""
    expert_params: tuple[str, ...]
    """Fused expert parameters inside `mlp.experts`, each shaped (E, ...)."""
    lora_expert_params: tuple[str, ...]
    """The subset that gets a per-expert LoRA in `model.finetune: lora`."""
    make_config: Callable[..., tf.PretrainedConfig]
    routing: RoutingKind = "softmax"
    """How the router turns logits into its choice (models/routing.py)."""


def _common(size: dict, vocab_size: int, max_positions: int, special: dict) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                max_position_embeddings=max_positions, **special)


def _mixtral(size, E, k, **kw):
    return tf.MixtralConfig(**kw, intermediate_size=size["ffn"], num_local_experts=E, num_experts_per_tok=k)


def _qwen2_moe(size, E, k, **kw):
    return tf.Qwen2MoeConfig(**kw, intermediate_size=size["ffn"], moe_intermediate_size=size["ffn"],
                             shared_expert_intermediate_size=size["ffn"], num_experts=E, num_experts_per_tok=k)


def _qwen3_moe(size, E, k, **kw):
    return tf.Qwen3MoeConfig(**kw, intermediate_size=size["ffn"], moe_intermediate_size=size["ffn"],
                             head_dim=size["hidden"] // size["heads"], num_experts=E, num_experts_per_tok=k)


def _olmoe(size, E, k, **kw):
    return tf.OlmoeConfig(**kw, intermediate_size=size["ffn"], num_experts=E, num_experts_per_tok=k)


def _deepseek_v3(size, E, k, **kw):
    head = size["hidden"] // size["heads"]
    # Multi-head latent attention gives every head its own key and value: grouped KV heads
    # would make sdpa repeat them and break as soon as an attention mask is passed.
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    return tf.DeepseekV3Config(**kw, intermediate_size=size["ffn"], moe_intermediate_size=size["ffn"],
                               n_routed_experts=E, num_experts_per_tok=k, n_shared_experts=1,
                               first_k_dense_replace=0, n_group=1, topk_group=1, q_lora_rank=None,
                               kv_lora_rank=head * 2, qk_rope_head_dim=head // 2, qk_nope_head_dim=head // 2,
                               v_head_dim=head, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _gpt_oss(size, E, k, **kw):
    return tf.GptOssConfig(**kw, intermediate_size=size["ffn"], head_dim=size["hidden"] // size["heads"],
                           num_local_experts=E, num_experts_per_tok=k,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


_FUSED = ("gate_up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    f.name: f for f in [
        Family("mixtral", "mlp.gate", _FUSED, _FUSED, _mixtral),
        Family("qwen2_moe", "mlp.gate", _FUSED, _FUSED, _qwen2_moe),
        Family("qwen3_moe", "mlp.gate", _FUSED, _FUSED, _qwen3_moe),
        Family("olmoe", "mlp.gate", _FUSED, _FUSED, _olmoe),
        Family("deepseek_v3", "mlp.gate", _FUSED, _FUSED, _deepseek_v3, routing="sigmoid_grouped"),
        Family("gpt_oss", "mlp.router", _FUSED + ("gate_up_proj_bias", "down_proj_bias"), _FUSED, _gpt_oss),
    ]
}

PRESET_SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128),
    "small": dict(hidden=128, layers=4, heads=4, kv_heads=2, ffn=256),
    # ~110M parameters with 8 experts: a client-group bench whose fp32 training state (~1.7 GB)
    # exceeds a per-rank budget that a group of 4 meets
    "medium": dict(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1024),
}


def dense_preset_config(preset: str, vocab_size: int, max_positions: int, pad_id: int, bos_id: int,
                        eos_id: int) -> tf.PretrainedConfig:
    """A dense Llama-architecture decoder (the base FedAMoLE adds LoRA experts to)."""
    size = PRESET_SIZES[preset]
    special = dict(pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False)
    return tf.LlamaConfig(**_common(size, vocab_size, max_positions, special), intermediate_size=size["ffn"])


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unsupported MoE family '{name}' (supported: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def preset_config(family: str, preset: str, num_experts: int, top_k: int, vocab_size: int,
                  max_positions: int, pad_id: int, bos_id: int, eos_id: int,
                  router_aux_loss_coef: float) -> tf.PretrainedConfig:
    special = dict(pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                   output_router_logits=True, router_aux_loss_coef=router_aux_loss_coef,
                   tie_word_embeddings=False)
    kwargs = _common(PRESET_SIZES[preset], vocab_size, max_positions, special)
    return family_of(family).make_config(PRESET_SIZES[preset], num_experts, top_k, **kwargs)
