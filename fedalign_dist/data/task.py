"""What a task type is: how an example becomes token ids, a training batch, a loss and
evaluation numbers. The built-in one is classification (data/classification.py); a user's
registers with @register_task (fedalign_dist.data.registry) and is chosen by data.task.

Shared here: causal-LM batches LEFT-padded with explicit position ids, so every target ends
at the last position and the LM head runs on the last `window` positions only
(`logits_to_keep`), which matters with a 50k vocabulary."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from pydantic import BaseModel

    from fedalign_dist.data.sources import Corpus

IGNORE = -100


class TaskType(ABC):
    """One task type. Evaluation works in sums (a float64 tensor) so that ranks can add them
    up; `summarise` turns the summed tensor into the named metrics."""
    name: ClassVar[str] = ""
    config_section: ClassVar["type[BaseModel] | None"] = None
    """A pydantic model (subclass fedalign_dist.config.ConfigSection): the knobs at data.<name>."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Corpus fields every example must have besides texts ("labels", "responses")."""
    metrics: ClassVar[tuple[str, ...]] = ()
    """The names `summarise` reports; the first is the headline (final_global_<first>; the
    report's and benchmark's curves), one where higher is better."""
    window: int = 1
    """Positions at the end of a sequence whose logits the loss and evaluation need."""

    def __init__(self, tokenizer, corpus: "Corpus", data_config, seed: int = 0):
        self.tok = tokenizer
        self.data_config = data_config
        self.seed = seed
        """The run's seed: any sample a task draws (e.g. examples to generate for) follows it."""
        self.options = getattr(data_config, self.name, None) if self.config_section is not None else None

    @classmethod
    def check_corpus(cls, corpus: "Corpus", source: str) -> None:
        missing = [f for f in cls.requires if getattr(corpus, f) is None]
        if missing:
            raise ValueError(f"data.task={cls.name} needs {' and '.join(missing)} for every example, but data "
                             f"source '{source}' gives none")

    @abstractmethod
    def encode(self, example: dict) -> dict:
        """One example (`text`; `label` / `response` where the corpus has them; `id`, its
        position in the data set) -> its encoded fields (token ids, ints, bools)."""

    @abstractmethod
    def train_batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Encoded examples -> input_ids, attention_mask, position_ids, labels (IGNORE where
        no loss is taken)."""

    def loss(self, model, batch: dict[str, torch.Tensor], aux_coef: float, balance=None) -> torch.Tensor:
        """Mean cross-entropy over the target tokens, plus the model's own router
        load-balancing loss (`balance`: see target_loss)."""
        return target_loss(model, batch, self.window, aux_coef, balance)

    def targets_in(self, batch: dict[str, torch.Tensor]) -> int:
        """The count `loss` averages over (a client group splits a batch by it)."""
        return target_count(batch["labels"], self.window)

    @abstractmethod
    def empty_sums(self) -> torch.Tensor:
        ...

    @abstractmethod
    def evaluate_sums(self, model, examples: list[dict], batch_size: int, device: torch.device) -> torch.Tensor:
        ...

    @abstractmethod
    def summarise(self, sums: torch.Tensor) -> dict[str, float | None]:
        """The metrics named in `metrics`, plus nonfinite_examples (examples a diverged model
        scored NaN: no metric computed from them is reported)."""


def left_pad(seqs: list[list[int]], targets: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Sequences and their loss targets (IGNORE where none), right-aligned in one batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (s, t) in enumerate(zip(seqs, targets)):
        ids[row, width - len(s):] = torch.tensor(s)
        lab[row, width - len(t):] = torch.tensor(t)
        mask[row, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": lab}


def target_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed log-probability of the target tokens, and their count. `logits` may
    cover only the last positions (logits_to_keep); labels are aligned to the same end."""
    labels = labels[:, -logits.shape[1]:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return picked.sum(-1), mask.sum(-1)


def target_count(labels: torch.Tensor, window: int) -> int:
    """How many target tokens target_loss averages over: the same window and shift."""
    keep = labels.shape[1] if window <= 0 else min(window, labels.shape[1])
    return int((labels[:, -keep:][:, 1:] != IGNORE).sum())


def target_loss(model, batch: dict[str, torch.Tensor], window: int, aux_coef: float, balance=None) -> torch.Tensor:
    """Mean over the batch's target tokens; a slice of a client group's batch divides by
    `loss_denominator` instead (its share of the whole batch's count), so that the group's
    averaged gradient is the whole batch's. `balance(router_logits, attention_mask)`, where
    given, computes the load-balancing loss in the model's place (a client group's, over its
    whole batch: clients/group_batch.py)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=window, output_router_logits=True)
    ll, count = target_log_likelihood(out.logits, batch["labels"])
    denominator = batch.get("loss_denominator")
    loss = -ll.sum() / (count.sum().clamp(min=1) if denominator is None else denominator)
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        if balance is not None and aux_coef:
            aux = balance(out.router_logits, batch["attention_mask"])
        loss = loss + aux_coef * aux.to(loss.dtype)
    return loss
