"""Pretrain the small MoE base: a Mixtral-style decoder (top-2 of 8 experts) with a BPE
vocabulary of its own, on the public text of corpus.py, in plain torch on CPU. Writes a
Hugging Face checkpoint (model, tokenizer) and card.json: size, text, time, held-out
perplexity before and after, and the roles check, with the command that made it.

    fedalign-dist pretrain --out fedalign_dist/models/pretrained/news-moe-8x [--steps N]
"""
from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from fedalign_dist import json_files
from fedalign_dist.pretrain.corpus import SOURCES, load_documents, split_documents
from fedalign_dist.pretrain.roles import KINDS, expert_roles, token_kind
from fedalign_dist.pretrain.tokenizer import train_tokenizer


@dataclass
class BaseSpec:
    vocab_size: int = 4096
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    expert_size: int = 256
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 8000
    lr: float = 3e-3
    warmup: int = 200
    heldout_fraction: float = 0.02
    seed: int = 0
    dense: bool = False
    """A dense Llama decoder instead (FedAMoLE's base): its MLP is top_k experts wide, so it
    does as much compute per token as the MoE, on the same text, tokenizer and schedule."""


def model_config(spec: BaseSpec, tokenizer):
    from transformers import LlamaConfig, MixtralConfig
    if spec.dense:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.top_k * spec.expert_size,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
            max_position_embeddings=4 * spec.seq_len, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
    return MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.expert_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        num_local_experts=spec.experts, num_experts_per_tok=spec.top_k, max_position_embeddings=4 * spec.seq_len,
        tie_word_embeddings=True, router_aux_loss_coef=0.01, output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def pack(tokenizer, docs: list[tuple[str, str]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents joined by end-of-sequence tokens, cut into rows of seq_len: (token ids, the
    source index of every token, the kind of every token)."""
    ids, sources = [], []
    encoded = tokenizer([text for _, text in docs], add_special_tokens=False)["input_ids"]
    for (source, _), tokens in zip(docs, encoded):
        ids += tokens + [tokenizer.eos_token_id]
        sources += [SOURCES.index(source)] * (len(tokens) + 1)
    rows = len(ids) // seq_len
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    kind_of = torch.tensor([token_kind(p) for p in pieces])
    ids = torch.tensor(ids[:rows * seq_len]).view(rows, seq_len)
    return ids, torch.tensor(sources[:rows * seq_len]).view(rows, seq_len), kind_of[ids]


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss  # router aux loss off in the config
        total += float(loss) * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def pretrain(spec: BaseSpec, out: Path, command: str, log=print) -> dict:
    from transformers import AutoModelForCausalLM
    started = time.time()
    torch.manual_seed(spec.seed)
    text = split_documents(load_documents(), spec.heldout_fraction, spec.seed)
    tokenizer = train_tokenizer([t for _, t in text.train], spec.vocab_size)
    train_rows, _, _ = pack(tokenizer, text.train, spec.seq_len)
    held_rows, held_sources, held_kinds = pack(tokenizer, text.heldout, spec.seq_len)
    log(f"pretraining text: {len(text.train):,} documents, {train_rows.numel():,} tokens; held out "
        f"{len(text.heldout):,} documents, {held_rows.numel():,} tokens; tokenizer of {len(tokenizer):,}")
    model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer))
    # a dense model has no experts, so no roles to measure
    measure_roles = None if spec.dense else partial(expert_roles, model, held_rows, held_sources, held_kinds,
                                                    len(SOURCES))
    roles_before = measure_roles() if measure_roles else None
    ppl_before = perplexity(model, held_rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / spec.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, spec.steps) / spec.steps)))
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(train_rows), generator=gen)
    t0 = time.time()
    for step in range(spec.steps):
        at = (step * spec.batch_size) % len(order)
        if at + spec.batch_size > len(order):
            order, at = torch.randperm(len(train_rows), generator=gen), 0
        batch = train_rows[order[at:at + spec.batch_size]]
        model.train()
        moe = {} if spec.dense else {"output_router_logits": True}  # with load balancing
        loss = model(input_ids=batch, labels=batch, **moe).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == spec.steps - 1:
            rate = (step + 1) * batch.numel() / (time.time() - t0)
            log(f"step {step:>6}  loss {float(loss.detach()):.3f}  {rate:,.0f} tokens/s")
    train_seconds = time.time() - t0
    ppl = perplexity(model, held_rows)
    roles_after = measure_roles() if measure_roles else None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    import transformers
    card = {
        "command": command, "spec": asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "text": {"sources": list(SOURCES), "train_documents": len(text.train), "train_tokens": train_rows.numel(),
                 "heldout_documents": len(text.heldout), "heldout_tokens": held_rows.numel()},
        "tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
        "heldout_perplexity": ppl, "heldout_perplexity_at_init": ppl_before,
        "roles": None if spec.dense else {"kinds": list(KINDS), "trained": roles_after, "at_init": roles_before},
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    (out / "card.json").write_text(json_files.dumps(card, indent=2) + "\n")
    log(f"held-out perplexity {ppl:.2f} (at init {ppl_before:.1f}); wrote {out}")
    return card
