"""Build the MoE causal LM (tiny preset offline, or a local checkpoint) and make the
federated parameters trainable: `full` (experts, routers and the rest unless frozen) or
`lora` (a PEFT LoRA per expert on the fused expert tensors; routers trained in full)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import transformers as tf

from fedalign_dist.models.amole import amole_modules, wrap_linear_layers
from fedalign_dist.models.anatomy import MoEAnatomy, ParamRole
from fedalign_dist.models.families import FAMILIES, dense_preset_config, family_of, preset_config
from fedalign_dist.models.packaged import NUM_EXPERTS_ATTRS, causal_lm_structure, check_exists, load_causal_lm, resolve


def _numel(param) -> int:
    return getattr(param, "ds_numel", None) or param.numel()  # a ZeRO-3 shard holds a slice


def describe_model(cfg, trainer, anatomy: MoEAnatomy) -> dict:
    """What was actually loaded and how it trains (the run folder's model.json)."""
    module = trainer.module
    config = getattr(module, "config", None)
    stored = getattr(config, "dtype", None)  # transformers 5 reads a stored torch_dtype into it; the old name warns
    return {"source": cfg.model.path or f"preset {cfg.model.preset}", "family": cfg.model.family,
            "model_type": getattr(config, "model_type", None),
            "num_experts": anatomy.num_experts or None,
            "top_k": getattr(config, "num_experts_per_tok", None) if anatomy.num_experts else None,
            "checkpoint_dtype": str(stored).removeprefix("torch.") if stored is not None else None,
            "compute_dtype": "bfloat16" if cfg.deepspeed.bf16 else "float32",
            "federated_state_dtype": "float32", "parameters": sum(_numel(p) for p in module.parameters()),
            "trainable_parameters": sum(_numel(p) for p in trainer.params.values()),
            "finetune": cfg.model.finetune,
            # client groups: the checkpoint read into the group's slices, or built whole on its first rank
            "read_into_slices": trainer.read_into_slices}


def check_model_path(path: str) -> None:
    """Fail fast (before any process group) on a path that is not a checkpoint directory."""
    p = check_exists(path)
    if p.suffix == ".gguf":
        return  # dense GGUF decoders (FedAMoLE); the family check is the config's
    model_type = tf.AutoConfig.from_pretrained(str(p), local_files_only=True).model_type
    if model_type == "llama":
        return
    if model_type not in FAMILIES:
        raise ValueError(f"model.path '{path}' is a '{model_type}' model; supported MoE families: "
                         f"{', '.join(FAMILIES)}")


_structure_only = False
PRESET_AUX_LOSS_COEF = 0.01  # a preset's router load-balancing weight unless model.router_aux_loss_coef says


@contextmanager
def structure_only(cfg):
    """Build the MoE model's structure without its weights: parameters on the meta device,
    buffers real. A client group's other ranks build so, since ZeRO-3 gives every rank its
    slice of the group's first rank's values: one whole model per group on the host, not one
    per rank. A checkpoint (model.path) is read for its config alone. Dense (llama) bases and
    GGUF files build whole."""
    global _structure_only
    if cfg.model.family == "llama" or (cfg.model.path is not None and resolve(cfg.model.path)[1] is not None):
        yield
        return
    from accelerate import init_empty_weights
    _structure_only = True
    try:
        with init_empty_weights(include_buffers=False):
            yield
    finally:
        _structure_only = False


def build_base_model(model_cfg, tokenizer, max_length: int, seed: int) -> tuple[torch.nn.Module, str, int]:
    """Returns (model, family name, number of experts). Same seed -> same weights on every rank."""
    torch.manual_seed(seed)
    if model_cfg.path is not None:
        # a folder, a GGUF file, or package:NAME; a group partner reads its config alone
        model = causal_lm_structure(model_cfg.path) if _structure_only else load_causal_lm(model_cfg.path)
        family = model.config.model_type
        if model_cfg.router_aux_loss_coef is not None:  # a training choice, not the architecture
            model.config.router_aux_loss_coef = model_cfg.router_aux_loss_coef
    else:
        family = model_cfg.family
        config = preset_config(family, model_cfg.preset, model_cfg.num_experts, model_cfg.top_k,
                               tokenizer.vocab_size, max_length, tokenizer.pad_id, tokenizer.bos_id,
                               tokenizer.eos_id, PRESET_AUX_LOSS_COEF if model_cfg.router_aux_loss_coef is None
                               else model_cfg.router_aux_loss_coef)
        model = tf.AutoModelForCausalLM.from_config(config)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                         f"{model.config.vocab_size}: use the tokenizer the model was trained with "
                         f"(data.tokenizer=model, or the one used to build it)")
    model.config.output_router_logits = True
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(model_cfg.experts_implementation)
    num_experts = next(getattr(model.config, a) for a in NUM_EXPERTS_ATTRS if hasattr(model.config, a))
    return model, family, num_experts


def make_trainable(model: torch.nn.Module, model_cfg, family_name: str) -> torch.nn.Module:
    family = family_of(family_name)
    if model_cfg.finetune == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(not any(tag in name for tag in model_cfg.freeze))
        return model
    import peft
    lora = peft.LoraConfig(
        r=model_cfg.lora.rank, lora_alpha=model_cfg.lora.alpha, lora_dropout=0.0, target_modules=[],
        target_parameters=[f"experts.{p}" for p in family.lora_expert_params],
        # The router, addressed by its path inside the layer so that e.g. Qwen2-MoE's
        # `shared_expert_gate` is not caught by a bare "gate".
        modules_to_save=[family.router_module])
    return peft.get_peft_model(model, lora)


def lora_base_model(cfg, tokenizer) -> torch.nn.Module | None:
    """The untrained base a LoRA run's adapter belongs to, when the run built it from a preset
    (saved beside the adapter); None when it came from model.path or no LoRA is trained."""
    if cfg.model.finetune != "lora" or cfg.model.path is not None:
        return None
    if cfg.model.family == "llama":
        return dense_base(cfg, tokenizer)
    return build_base_model(cfg.model, tokenizer, cfg.data.max_length, cfg.seed)[0]


def dense_base(cfg, tokenizer) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.model.path is not None:
        model = load_causal_lm(cfg.model.path)
    else:
        model = tf.AutoModelForCausalLM.from_config(dense_preset_config(
            cfg.model.preset, tokenizer.vocab_size, cfg.data.max_length, tokenizer.pad_id, tokenizer.bos_id,
            tokenizer.eos_id))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                         f"{model.config.vocab_size}: use the tokenizer the model was trained with")
    return model


def build_amole_model(cfg, tokenizer) -> tuple[torch.nn.Module, MoEAnatomy]:
    """A dense decoder, frozen, with AMoLE adapters on the target linear layers (FedAMoLE).
    Each adapted layer is one 'layer' of the anatomy; its routed experts are role expert."""
    model = dense_base(cfg, tokenizer)
    for param in model.parameters():
        param.requires_grad_(False)
    k = cfg.strategy.fedamole
    wrap_linear_layers(model, k.target_modules, k.num_experts, k.rank, k.alpha, k.top_k)
    owners = list(amole_modules(model))
    roles = {}
    for name, _ in model.named_parameters():
        owner, leaf = name.rsplit(".", 1)
        if owner in owners and leaf in ("experts_A", "experts_B"):
            roles[name] = ParamRole("expert", owners.index(owner), leaf)
        else:
            roles[name] = ParamRole("other", owners.index(owner) if owner in owners else None)
    return model, MoEAnatomy.from_roles(roles, k.num_experts)


def build_dense_model(cfg, tokenizer) -> tuple[torch.nn.Module, MoEAnatomy]:
    """A dense decoder for the baselines on FedAMoLE's base: full fine-tuning, or one PEFT
    LoRA per target linear layer (`model.lora.*`); every parameter is role `other`."""
    model = dense_base(cfg, tokenizer)
    if cfg.model.finetune == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.model.lora.rank, lora_alpha=cfg.model.lora.alpha,
                                                           lora_dropout=0.0,
                                                           target_modules=cfg.model.lora.target_modules))
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(not any(tag in name for tag in cfg.model.freeze))
    roles = {name: ParamRole("other") for name, _ in model.named_parameters()}
    return model, MoEAnatomy.from_roles(roles, num_experts=0)


def build_model(cfg, tokenizer) -> tuple[torch.nn.Module, MoEAnatomy]:
    """The model as `model.*` describes it: an MoE model, or a dense decoder (family llama).
    A strategy may build its own instead (Strategy.build_model: FedAMoLE's adapters)."""
    if cfg.model.family == "llama":
        return build_dense_model(cfg, tokenizer)
    model, family, num_experts = build_base_model(cfg.model, tokenizer, cfg.data.max_length, cfg.seed)
    model = make_trainable(model, cfg.model, family)
    return model, MoEAnatomy(model, family_of(family), num_experts)
