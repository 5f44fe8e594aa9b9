"""The classification task: causal LM on "<text>\\nTopic: <label>", loss on the answer only;
accuracy by comparing the full log-likelihoods of every label's answer; perplexity of the
true answer."""
from __future__ import annotations

import math

import torch

from fedalign_dist.config import ConfigSection
from fedalign_dist.data.registry import register_task
from fedalign_dist.data.task import IGNORE, TaskType, left_pad, target_log_likelihood


class ClassificationConfig(ConfigSection):
    prompt_suffix: str = "\nTopic:"
    """Put after the text; the model then writes ' <label name>' and end-of-sequence."""


@register_task("classification")
class ClassificationTask(TaskType):
    config_section = ClassificationConfig
    requires = ("labels",)
    metrics = ("accuracy", "perplexity")

    def __init__(self, tokenizer, corpus, data_config, seed: int = 0):
        super().__init__(tokenizer, corpus, data_config, seed)
        max_length = data_config.max_length
        self.label_names = list(corpus.label_names)
        self.answers = [tokenizer.encode(" " + name) + [tokenizer.eos_id] for name in self.label_names]
        self.suffix = tokenizer.encode(self.options.prompt_suffix)
        self.max_prompt = max_length - max(len(a) for a in self.answers)
        self.window = max(len(a) for a in self.answers) + 1
        """The answer tokens and the one before them."""
        if self.max_prompt <= len(self.suffix) + 4:
            raise ValueError(f"data.max_length={max_length} leaves no room for the text (the longest label's "
                             f"answer takes {max(len(a) for a in self.answers)} tokens)")

    def encode(self, example: dict) -> dict:
        return {"prompt": self.encode_prompt(example["text"]), "label": int(example["label"])}

    def encode_prompt(self, text: str) -> list[int]:
        # Keep the text's beginning (headline and lead); cut from the character side first
        # so long articles do not cost a full tokenisation.
        body = self.tok.encode(text[: self.max_prompt * 8])[: self.max_prompt - len(self.suffix)]
        return [self.tok.bos_id] + body[: self.max_prompt - len(self.suffix) - 1] + self.suffix

    def train_batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs, targets = [], []
        for ex in examples:
            answer = self.answers[ex["label"]]
            seqs.append(ex["prompt"] + answer)
            targets.append([IGNORE] * len(ex["prompt"]) + answer)
        return left_pad(seqs, targets, self.tok.pad_id)

    def choice_batch(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Every prompt with every label answer: rows ordered (example, label)."""
        seqs, targets = [], []
        for prompt in prompts:
            for answer in self.answers:
                seqs.append(prompt + answer)
                targets.append([IGNORE] * len(prompt) + answer)
        return left_pad(seqs, targets, self.tok.pad_id)

    def empty_sums(self) -> torch.Tensor:
        return torch.zeros(5, dtype=torch.float64)

    @torch.no_grad()
    def evaluate_sums(self, model, examples: list[dict], batch_size: int, device: torch.device) -> torch.Tensor:
        """[correct, count, answer_nll_sum, answer_tokens, nonfinite]; an example whose label
        scores are not all finite (a diverged model) is never counted as correct (argmax over
        NaN would pick label 0)."""
        was_training = model.training
        model.eval()
        num_labels = len(self.label_names)
        sums = self.empty_sums()
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            gold = torch.tensor([ex["label"] for ex in chunk])
            batch = {k: v.to(device) for k, v in self.choice_batch([ex["prompt"] for ex in chunk]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], logits_to_keep=self.window).logits
            ll, ntok = target_log_likelihood(logits, batch["labels"])
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

    def summarise(self, sums: torch.Tensor) -> dict[str, float | None]:
        """None for both metrics when any example's scores were non-finite, nan when there
        were no examples."""
        correct, count, nll, ntok, nonfinite = (float(x) for x in sums)
        if nonfinite:
            return {"accuracy": None, "perplexity": None, "nonfinite_examples": int(nonfinite)}
        return {"accuracy": correct / count if count else float("nan"),
                "perplexity": math.exp(nll / ntok) if ntok else float("nan"), "nonfinite_examples": 0}
