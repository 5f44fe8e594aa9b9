"""The instruction task: a prompt and its response, the loss on the response only (through the
tokenizer's chat template when the model has one). Evaluated by the response's perplexity
(teacher forced) and by ROUGE-L (the rouge-score package) of greedy generations for a fixed
seeded sample of the examples (`generate_fraction`), chosen per example, so the same examples
are generated every round whichever rank or evaluation holds them."""
from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field

from fedalign_dist.config_sections import ConfigSection
from fedalign_dist.data.registry import register_task
from fedalign_dist.data.task import IGNORE, TaskType, left_pad, target_log_likelihood

PLAIN_SUFFIX = "\nAnswer:"


class InstructionConfig(ConfigSection):
    max_response_tokens: int = Field(24, ge=1)
    """Responses are cut to this many tokens (plus end-of-sequence); the prompt gets the rest
    of data.max_length."""
    generate_fraction: float = Field(0.1, ge=0, le=1)
    """Share of the examples that get a greedy generation scored by ROUGE-L, a sample drawn
    once from the seed (the same every round, on any number of ranks); 0 = perplexity only."""
    chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template when it has one; without one (or
    false) the prompt is "<text>\\nAnswer:"."""


@register_task("instruction")
class InstructionTask(TaskType):
    config_section = InstructionConfig
    requires = ("responses",)
    metrics = ("rougeL", "perplexity")

    def __init__(self, tokenizer, corpus, data_config, seed: int = 0):
        super().__init__(tokenizer, corpus, data_config, seed)
        self.max_response = self.options.max_response_tokens + 1  # with end-of-sequence
        self.window = self.max_response + 1
        self.max_prompt = data_config.max_length - self.max_response
        template = getattr(getattr(tokenizer, "tok", None), "chat_template", None)
        self.template = tokenizer.tok if template and self.options.chat_template else None
        # tokens around the text: the chat template's (system prompt, turn markers) or the plain suffix
        self.overhead = len(self._chat([])) if self.template is not None else len(tokenizer.encode(PLAIN_SUFFIX)) + 1
        if self.max_prompt <= self.overhead + 4:
            raise ValueError(f"data.max_length={data_config.max_length} leaves no room for the prompt: the response "
                             f"takes {self.max_response} tokens (data.instruction.max_response_tokens) and the "
                             f"{'chat template' if self.template is not None else 'prompt format'} {self.overhead}")
        from rouge_score import rouge_scorer
        self.rouge = rouge_scorer.RougeScorer(["rougeL"])

    def encode(self, example: dict) -> dict:
        response = example["response"].strip() if self.template is not None else " " + example["response"].strip()
        sampled = np.random.default_rng([self.seed, 0x6E4, example["id"]]).random() < self.options.generate_fraction
        return {"prompt": self.encode_prompt(example["text"]),
                "response": self.tok.encode(response)[: self.max_response - 1] + [self.tok.eos_id],
                "generate": bool(sampled)}

    def encode_prompt(self, text: str) -> list[int]:
        # the text is cut (its beginning kept), never the template or suffix around it
        body = self.tok.encode(text[: self.max_prompt * 8])[: self.max_prompt - self.overhead]
        if self.template is not None:
            ids = self._chat(body)
            while len(ids) > self.max_prompt:  # decoding and re-encoding the cut text can merge differently
                body = body[: len(body) - (len(ids) - self.max_prompt)]
                ids = self._chat(body)
            return ids
        return [self.tok.bos_id] + body + self.tok.encode(PLAIN_SUFFIX)

    def _chat(self, body: list[int]) -> list[int]:
        ids = self.template.apply_chat_template([{"role": "user", "content": self.tok.decode(body)}],
                                                add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def train_batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [ex["prompt"] + ex["response"] for ex in examples]
        targets = [[IGNORE] * len(ex["prompt"]) + ex["response"] for ex in examples]
        return left_pad(seqs, targets, self.tok.pad_id)

    def empty_sums(self) -> torch.Tensor:
        return torch.zeros(6, dtype=torch.float64)

    @torch.no_grad()
    def evaluate_sums(self, model, examples: list[dict], batch_size: int, device: torch.device) -> torch.Tensor:
        """[response_nll_sum, response_tokens, rougeL_sum, generated, count, nonfinite]."""
        was_training = model.training
        model.eval()
        sums = self.empty_sums()
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in self.train_batch(chunk).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], logits_to_keep=self.window).logits
            ll, ntok = (t.cpu().double() for t in target_log_likelihood(logits, batch["labels"]))
            finite = torch.isfinite(ll)
            sums[0] += -ll[finite].sum()
            sums[1] += ntok[finite].sum()
            sums[4] += len(chunk)
            sums[5] += (~finite).sum()
        wanted = [ex for ex in examples if ex["generate"]]
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start:start + batch_size]
            produced = greedy_generate(model, [ex["prompt"] for ex in chunk], self.max_response, self.tok, device)
            for ex, ids in zip(chunk, produced):
                reference = self.tok.decode([t for t in ex["response"] if t != self.tok.eos_id])
                sums[2] += self.rouge.score(reference, self.tok.decode(ids))["rougeL"].fmeasure
                sums[3] += 1
        model.train(was_training)
        return sums

    def summarise(self, sums: torch.Tensor) -> dict[str, float | None]:
        nll, ntok, rouge, generated, count, nonfinite = (float(x) for x in sums)
        if nonfinite:
            return {"rougeL": None, "perplexity": None, "nonfinite_examples": int(nonfinite)}
        return {"rougeL": rouge / generated if generated else float("nan"),
                "perplexity": math.exp(nll / ntok) if ntok else float("nan"), "nonfinite_examples": 0}


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, tok, device) -> list[list[int]]:
    """Greedy continuations (without the end-of-sequence token), left-padded like training so
    any model that takes position ids works (no cache: responses are short)."""
    batch = left_pad(prompts, [[] for _ in prompts], tok.pad_id)
    ids, mask, positions = (batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids"))
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        step = logits.float().argmax(-1)
        for row, token in enumerate(step.tolist()):
            if not done[row]:
                if token == tok.eos_id:
                    done[row] = True
                else:
                    out[row].append(token)
        if bool(done.all()):
            break
        ids = torch.cat([ids, step[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return out
