"""Evaluation as sums (so ranks can add them up): accuracy by comparing the label words'
log-likelihoods, and the true answer's token-level negative log-likelihood (perplexity)."""
from __future__ import annotations

import math

import torch

from fedalign_dist.data.task import answer_log_likelihood


@torch.no_grad()
def evaluate_sums(model, task, prompts: list[list[int]], labels: list[int], batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """[correct, count, answer_nll_sum, answer_tokens, nonfinite] over the given examples;
    nonfinite counts examples whose label scores are not all finite (a diverged model): they
    are never counted as correct (argmax over NaN would pick label 0)."""
    was_training = model.training
    model.eval()
    num_labels = len(task.label_names)
    sums = empty_sums()
    for start in range(0, len(prompts), batch_size):
        chunk, gold = prompts[start:start + batch_size], torch.tensor(labels[start:start + batch_size])
        batch = {k: v.to(device) for k, v in task.choice_batch(chunk).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=task.window).logits
        ll, ntok = answer_log_likelihood(logits, batch["labels"])
        ll, ntok = ll.view(-1, num_labels).cpu(), ntok.view(-1, num_labels).cpu()
        finite = torch.isfinite(ll).all(-1)
        sums[0] += ((ll.argmax(-1) == gold) & finite).sum()
        sums[1] += len(chunk)
        rows = torch.arange(len(chunk))
        sums[2] += -ll[rows, gold].double()[finite].sum()
        sums[3] += ntok[rows, gold].double()[finite].sum()
        sums[4] += (~finite).sum()
    model.train(was_training)
    return sums


def empty_sums() -> torch.Tensor:
    return torch.zeros(5, dtype=torch.float64)


def summarise(sums: torch.Tensor) -> dict[str, float | None]:
    """Accuracy and perplexity; None for both when any example's scores were non-finite (no
    number computed from NaN scores is reported), nan when there were no examples."""
    correct, count, nll, ntok, nonfinite = (float(x) for x in sums)
    if nonfinite:
        return {"accuracy": None, "perplexity": None, "nonfinite_examples": int(nonfinite)}
    return {"accuracy": correct / count if count else float("nan"),
            "perplexity": math.exp(nll / ntok) if ntok else float("nan"), "nonfinite_examples": 0}
