"""A real tiny Mixtral's anatomy and trainable state, for strategy tests in one process."""
from fedalign_dist.config import load_config
from fedalign_dist.data.tokenizer import ByteTokenizer
from fedalign_dist.models.build import build_model


def tiny_mixtral_layout(num_experts: int):
    """(anatomy, {name: trainable tensor}) of the tiny Mixtral preset with `num_experts` experts."""
    cfg = load_config(None, [f"model.num_experts={num_experts}", "data.max_length=32"])
    model, anatomy = build_model(cfg, ByteTokenizer())
    return anatomy, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
