"""The task: causal LM on "<article>\\nTopic: <label>", loss on the answer only; accuracy by
comparing the label words' log-likelihoods; perplexity of the answer.

Sequences are LEFT-padded (with explicit position ids) so every answer ends at the last
position: the LM head then runs on the last `window` positions only (`logits_to_keep`),
which matters with a 50k vocabulary."""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
PROMPT_SUFFIX = "\nTopic:"


@dataclass
class Encoded:
    prompts: list[list[int]]
    labels: list[int]


class Task:
    def __init__(self, tokenizer, label_names: list[str], max_length: int):
        self.tok = tokenizer
        self.label_names = label_names
        self.answers = [tokenizer.encode(" " + name) + [tokenizer.eos_id] for name in label_names]
        self.suffix = tokenizer.encode(PROMPT_SUFFIX)
        self.max_prompt = max_length - max(len(a) for a in self.answers)
        self.window = max(len(a) for a in self.answers) + 1
        """Positions whose logits are needed: the answer tokens and the one before them."""
        if self.max_prompt <= len(self.suffix) + 4:
            raise ValueError(f"data.max_length={max_length} leaves no room for the article")

    def encode_prompt(self, text: str) -> list[int]:
        # Keep the article's beginning (headline and lead); cut from the character side first
        # so long articles do not cost a full tokenisation.
        body = self.tok.encode(text[: self.max_prompt * 8])[: self.max_prompt - len(self.suffix)]
        return [self.tok.bos_id] + body[: self.max_prompt - len(self.suffix) - 1] + self.suffix

    def _pad(self, seqs: list[list[int]], targets: list[list[int]]):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (s, t) in enumerate(zip(seqs, targets)):
            ids[row, width - len(s):] = torch.tensor(s)
            lab[row, width - len(t):] = torch.tensor(t)
            mask[row, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": lab}

    def train_batch(self, prompts: list[list[int]], labels: list[int]) -> dict[str, torch.Tensor]:
        seqs, targets = [], []
        for prompt, label in zip(prompts, labels):
            answer = self.answers[label]
            seqs.append(prompt + answer)
            targets.append([IGNORE] * len(prompt) + answer)
        return self._pad(seqs, targets)

    def choice_batch(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Every prompt with every label answer: rows ordered (example, label)."""
        seqs, targets = [], []
        for prompt in prompts:
            for answer in self.answers:
                seqs.append(prompt + answer)
                targets.append([IGNORE] * len(prompt) + answer)
        return self._pad(seqs, targets)


def answer_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed log-probability of the answer tokens, and their count. `logits` may
    cover only the last positions (logits_to_keep); labels are aligned to the same end."""
    labels = labels[:, -logits.shape[1]:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return picked.sum(-1), mask.sum(-1)


def answer_loss(model, batch: dict[str, torch.Tensor], window: int, aux_coef: float) -> torch.Tensor:
    """Mean cross-entropy over answer tokens, plus the model's own router load-balancing loss."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=window, output_router_logits=True)
    ll, count = answer_log_likelihood(out.logits, batch["labels"])
    loss = -ll.sum() / count.sum().clamp(min=1)
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + aux_coef * aux.to(loss.dtype)
    return loss
