"""Evaluation as sums (so ranks can add them up): accuracy by comparing the label words'
log-likelihoods, and the true answer's token-level negative log-likelihood (perplexity)."""
from __future__ import annotations

import math

import torch

from fedalign_dist.data.task import answer_log_likelihood


@torch.no_grad()
def evaluate_sums(model, task, prompts: list[list[int]], labels: list[int], batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """[correct, count, answer_nll_sum, answer_tokens] over the given examples."""
    was_training = model.training
    model.eval()
    num_labels = len(task.label_names)
    sums = torch.zeros(4, dtype=torch.float64)
    for start in range(0, len(prompts), batch_size):
        chunk, gold = prompts[start:start + batch_size], torch.tensor(labels[start:start + batch_size])
        batch = {k: v.to(device) for k, v in task.choice_batch(chunk).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=task.window).logits
        ll, ntok = answer_log_likelihood(logits, batch["labels"])
        ll, ntok = ll.view(-1, num_labels).cpu(), ntok.view(-1, num_labels).cpu()
        sums[0] += (ll.argmax(-1) == gold).sum()
        sums[1] += len(chunk)
        rows = torch.arange(len(chunk))
        sums[2] += -ll[rows, gold].double().sum()
        sums[3] += ntok[rows, gold].double().sum()
    model.train(was_training)
    return sums


def summarise(sums: torch.Tensor) -> dict[str, float]:
    correct, count, nll, ntok = (float(x) for x in sums)
    return {"accuracy": correct / count if count else float("nan"),
            "perplexity": math.exp(nll / ntok) if ntok else float("nan")}
