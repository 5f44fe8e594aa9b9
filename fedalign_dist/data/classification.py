"""The classification task: causal LM on "<text>\\nTopic: <label>", loss on the answer only (the
label's tokens, and end-of-sequence where labels need it);
accuracy by comparing the full log-likelihoods of every label's answer; perplexity of the
true answer. Every label is scored in one pass over the prompt: the prompt's KV cache is
computed once and shared by the label answers (not one full sequence per label)."""
from __future__ import annotations

import copy
import math
from typing import Literal

import torch

from fedalign_dist.config_sections import ConfigSection
from fedalign_dist.data.registry import register_task
from fedalign_dist.data.task import IGNORE, TaskType, left_pad


class ClassificationConfig(ConfigSection):
    prompt_suffix: str = "\nTopic:"
    """Put after the text; the model then writes ' <label name>' (and end-of-sequence, see end_token)."""
    end_token: Literal["auto", "always"] = "auto"
    """always: every answer ends with end-of-sequence, trained and scored; auto: only when one
    label's tokens begin another's, the one case where the labels cannot be told apart without
    it (else it would cost a second scoring pass per label, most of evaluation's time)."""


SCORING_LOGITS_BYTES = 64 * 2**20
"""Bound on the float32 continuation logits of one scoring pass."""


@register_task("classification")
class ClassificationTask(TaskType):
    config_section = ClassificationConfig
    requires = ("labels",)
    metrics = ("accuracy", "perplexity")

    def __init__(self, tokenizer, corpus, data_config, seed: int = 0):
        super().__init__(tokenizer, corpus, data_config, seed)
        max_length = data_config.max_length
        self.label_names = list(corpus.label_names)
        words = [tokenizer.encode(" " + name) for name in self.label_names]
        # a subclass's own config section may name only prompt_suffix: the default then holds
        ended = getattr(self.options, "end_token", "auto") == "always" or prefix_clash(words)
        self.answers = [w + [tokenizer.eos_id] if ended else w for w in words]
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

    def empty_sums(self) -> torch.Tensor:
        return torch.zeros(5, dtype=torch.float64)

    @torch.no_grad()
    def evaluate_sums(self, model, examples: list[dict], batch_size: int, device: torch.device) -> torch.Tensor:
        """[correct, count, answer_nll_sum, answer_tokens, nonfinite]; an example whose label
        scores are not all finite (a diverged model) is never counted as correct (argmax over
        NaN would pick label 0)."""
        was_training = model.training
        model.eval()
        sums = self.empty_sums()
        step = self.examples_per_pass(model, batch_size)
        for start in range(0, len(examples), step):
            chunk = examples[start:start + step]
            gold = torch.tensor([ex["label"] for ex in chunk])
            ll, ntok = self.label_log_likelihoods(model, [ex["prompt"] for ex in chunk], device)
            finite = torch.isfinite(ll).all(-1)
            sums[0] += ((ll.argmax(-1) == gold) & finite).sum()
            sums[1] += len(chunk)
            rows = torch.arange(len(chunk))
            sums[2] += -ll[rows, gold].double()[finite].sum()
            sums[3] += ntok[rows, gold].double()[finite].sum()
            sums[4] += (~finite).sum()
        model.train(was_training)
        return sums

    def examples_per_pass(self, model, batch_size: int) -> int:
        """eval.batch_size, or fewer where the answers' continuation logits (examples x labels x
        answer tokens x vocabulary) would pass SCORING_LOGITS_BYTES: 16 outlet names of up to 4
        GPT-2 tokens at batch 32 took 650 MB of peak memory, at 6 a tenth, and no longer."""
        width = max(len(a) for a in self.answers)
        if width == 1:
            return batch_size
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or self.tok.vocab_size
        per_example = len(self.answers) * (width - 1) * vocab * 4
        return max(1, min(batch_size, SCORING_LOGITS_BYTES // per_example))

    def label_log_likelihoods(self, model, prompts: list[list[int]], device: torch.device):
        """(examples, labels) summed log-probabilities of every label's answer after each
        prompt, and the answers' token counts. The prompts run once (left-padded, their KV
        cache kept); for each answer length, the cache is repeated once per label of that length
        and those answers continue from it."""
        n, labels = len(prompts), len(self.answers)
        width = max(len(a) for a in self.answers)
        batch = {k: v.to(device) for k, v in left_pad(prompts, [[] for _ in prompts], self.tok.pad_id).items()}
        # no router statistics here: nothing uses them, and some families (GPT-OSS) would compute
        # their load-balancing loss over the cached positions too, against a mask that is longer
        # than the new tokens
        routed = getattr(getattr(model, "config", None), "output_router_logits", False)
        quiet = {"output_router_logits": False} if routed else {}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=width > 1, logits_to_keep=1, **quiet)
        first = out.logits[:, -1].float()  # predicts each answer's first token
        answers = torch.full((labels, width), self.tok.pad_id, dtype=torch.long)
        present = torch.zeros((labels, width), dtype=torch.long)
        for row, answer in enumerate(self.answers):
            answers[row, :len(answer)] = torch.tensor(answer)
            present[row, :len(answer)] = 1
        ids, kept = answers.to(device).repeat(n, 1), present.to(device).repeat(n, 1)
        # log-probabilities as logit - logsumexp: no vocabulary-sized log_softmax is written out
        ll = (first.gather(-1, answers[:, 0].to(device).repeat(n, 1)) - first.logsumexp(-1, keepdim=True)).reshape(-1)
        ll = ll.view(n, labels)
        # The answers continue from the prompt's cache, one pass per answer length, so no
        # position is padding (byte-level labels of 4-13 tokens padded to the longest spent
        # about half the pass on it). An answer's last token is only ever a target, so it is
        # not fed: input token j predicts answer token j + 1.
        lengths = [len(a) for a in self.answers]
        groups = sorted({size for size in lengths if size > 1})
        for i, size in enumerate(groups):
            members = [row for row, length in enumerate(lengths) if length == size]
            k = len(members)
            # a pass appends to the cache it is given: every pass but the last gets a copy
            cache = out.past_key_values if i == len(groups) - 1 else copy.deepcopy(out.past_key_values)
            cache.batch_repeat_interleave(k)
            group_ids = ids.view(n, labels, width)[:, members, :size].reshape(n * k, size)
            mask = torch.cat([batch["attention_mask"].repeat_interleave(k, 0),
                              torch.ones((n * k, size - 1), dtype=batch["attention_mask"].dtype, device=device)], 1)
            positions = (
                batch["position_ids"][:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(size - 1, device=device)
            )
            logits = model(input_ids=group_ids[:, :-1], attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=False, **quiet).logits.float()
            rest = logits.gather(-1, group_ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
            ll[:, members] += rest.sum(-1).view(n, k)
        return ll.cpu(), kept.sum(-1).view(n, labels).cpu()

    def summarise(self, sums: torch.Tensor) -> dict[str, float | None]:
        """None for both metrics when any example's scores were non-finite, nan when there
        were no examples."""
        correct, count, nll, ntok, nonfinite = (float(x) for x in sums)
        if nonfinite:
            return {"accuracy": None, "perplexity": None, "nonfinite_examples": int(nonfinite)}
        return {"accuracy": correct / count if count else float("nan"),
                "perplexity": math.exp(nll / ntok) if ntok else float("nan"), "nonfinite_examples": 0}


def prefix_clash(answers: list[list[int]]) -> bool:
    """Whether some answer's tokens begin another's (or two are equal): without an end token the
    shorter one would always score at least as high."""
    return any(i != j and b[:len(a)] == a for i, a in enumerate(answers) for j, b in enumerate(answers))
