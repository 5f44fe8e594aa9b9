import math

import pytest
import torch

from fedalign_dist.config import load_config
from fedalign_dist.data.classification import ClassificationTask
from fedalign_dist.data.sources import Corpus
from fedalign_dist.data.task import IGNORE, target_log_likelihood
from fedalign_dist.data.tokenizer import ByteTokenizer


def classification(label_names, max_length=64, end_token="auto", tokenizer=None):
    corpus = Corpus(["x"] * len(label_names), list(range(len(label_names))), label_names)
    data = load_config(None, [f"data.max_length={max_length}", f"data.classification.end_token={end_token}"]).data
    return ClassificationTask(tokenizer or ByteTokenizer(), corpus, data)


def test_answers_end_with_eos_only_where_labels_need_it():
    eos = ByteTokenizer().eos_id
    assert all(a[-1] != eos for a in classification(["sport", "tech"]).answers)
    # " sport" begins " sports": without an end token " sport" would always score at least as high
    assert all(a[-1] == eos for a in classification(["sport", "sports"]).answers)
    assert all(a[-1] == eos for a in classification(["a", "a"]).answers)
    assert all(a[-1] == eos for a in classification(["sport", "tech"], end_token="always").answers)
    from fedalign_dist.data.tokenizer import build_tokenizer
    bbc = classification(["business", "entertainment", "politics", "sports", "tech"], tokenizer=build_tokenizer("gpt2"))
    assert [len(a) for a in bbc.answers] == [1] * 5  # one token each: scored from the prompt's last position


def test_train_batch_puts_loss_on_answer_only():
    task = classification(["sport", "tech"])
    example = task.encode({"text": "A long article about football. " * 20, "label": 1})
    prompt = example["prompt"]
    assert len(prompt) + max(map(len, task.answers)) <= 64 and example["label"] == 1
    batch = task.train_batch([example])
    labels = batch["labels"][0]
    answer = labels[labels != IGNORE].tolist()
    assert answer == task.answers[1] and ByteTokenizer().decode(answer) == " tech"


def test_target_log_likelihood_hand_computed():
    # vocab 3, uniform logits except position 1 strongly predicts token 2
    logits = torch.zeros(1, 3, 3)
    logits[0, 1, 2] = math.log(8.0)  # p(2) = 8/10
    labels = torch.tensor([[IGNORE, IGNORE, 2]])
    ll, n = target_log_likelihood(logits, labels)
    assert n.item() == 1 and ll.item() == __import__("pytest").approx(math.log(0.8))


def test_summarise():
    summarise = classification(["a", "b"]).summarise
    out = summarise(torch.tensor([3.0, 4.0, 2.0, 2.0, 0.0], dtype=torch.float64))
    assert out["accuracy"] == 0.75 and abs(out["perplexity"] - math.e) < 1e-9
    # one example scored NaN: no accuracy or perplexity is reported for these sums
    out = summarise(torch.tensor([3.0, 4.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    assert out["accuracy"] is None and out["perplexity"] is None and out["nonfinite_examples"] == 1


def test_gpt2_tokenizer_from_package_round_trips():
    from fedalign_dist.data.tokenizer import build_tokenizer
    tok = build_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    ids = tok.encode(" business news")
    assert len(ids) == 2 and tok.decode(ids) == " business news"


def _scored_as_full_sequences(model, task, prompts):
    """The reference: every (prompt, label answer) as its own left-padded sequence."""
    from fedalign_dist.data.task import left_pad
    seqs = [p + a for p in prompts for a in task.answers]
    targets = [[IGNORE] * len(p) + a for p in prompts for a in task.answers]
    batch = left_pad(seqs, targets, task.tok.pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    ll, n = target_log_likelihood(logits, batch["labels"])
    return ll.view(len(prompts), -1), n.view(len(prompts), -1)


@pytest.mark.parametrize("family,finetune,end_token", [(f, "full", "auto") for f in (
    "deepseek_v3", "gpt_oss", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "llama")]
                         + [("mixtral", "lora", "auto"), ("mixtral", "full", "always")])
def test_shared_prompt_scoring_equals_one_sequence_per_label(family, finetune, end_token):
    """Scoring every label from the prompt's shared KV cache gives the same log-likelihoods as
    scoring each (prompt, answer) sequence on its own, for every family, with padding."""
    from fedalign_dist.models.build import build_model
    overrides = [f"model.family={family}", f"model.finetune={finetune}", "data.max_length=48"]
    if family == "llama":
        overrides += ["strategy.name=fedavg"]
    cfg = load_config(None, overrides)
    model, _ = build_model(cfg, ByteTokenizer())
    model.eval()
    # answers of 6, 5 and 14 bytes (one more each with the end token)
    task = classification(["sport", "tech", "business news"], max_length=48, end_token=end_token)
    prompts = [
        task.encode({"text": t, "label": 0})["prompt"] for t in ("A match report.", "Chips", "Markets fell " * 3)
    ]
    with torch.no_grad():
        got, count = task.label_log_likelihoods(model, prompts, torch.device("cpu"))
        want, want_count = _scored_as_full_sequences(model, task, prompts)
    assert torch.equal(count, want_count)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


def test_single_token_answers_are_scored_from_the_prompt_alone():
    """GPT-2 BPE topic words are one token each: no continuation pass, the same log-likelihoods
    as full sequences."""
    from fedalign_dist.data.tokenizer import build_tokenizer
    from fedalign_dist.models.build import build_model
    tok = build_tokenizer("gpt2")
    model, _ = build_model(load_config(None, ["data.tokenizer=gpt2", "data.max_length=48"]), tok)
    model.eval()
    task = classification(["business", "politics", "tech"], max_length=48, tokenizer=tok)
    prompts = [task.encode({"text": t, "label": 0})["prompt"] for t in ("Shares rose.", "The vote " * 4)]
    with torch.no_grad():
        got, count = task.label_log_likelihoods(model, prompts, torch.device("cpu"))
        want, want_count = _scored_as_full_sequences(model, task, prompts)
    assert count.eq(1).all() and torch.equal(count, want_count)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


def test_scoring_passes_keep_the_continuation_logits_bounded():
    """Many multi-token labels over a large vocabulary: fewer examples per pass, the logits of
    one pass within the budget; one-token answers and small vocabularies keep eval.batch_size."""
    from types import SimpleNamespace

    from fedalign_dist.data.classification import SCORING_LOGITS_BYTES
    from fedalign_dist.data.tokenizer import build_tokenizer
    tok = build_tokenizer("gpt2")
    big = SimpleNamespace(config=SimpleNamespace(vocab_size=tok.vocab_size))
    outlets = classification([f"outlet number {i}" for i in range(16)], tokenizer=tok)
    width = max(map(len, outlets.answers))
    step = outlets.examples_per_pass(big, 32)
    assert 1 <= step < 32 and step * 16 * (width - 1) * tok.vocab_size * 4 <= SCORING_LOGITS_BYTES
    assert classification(["business", "tech"], tokenizer=tok).examples_per_pass(big, 32) == 32
    small = SimpleNamespace(config=SimpleNamespace(vocab_size=ByteTokenizer().vocab_size))
    assert classification(["sport", "tech"]).examples_per_pass(small, 32) == 32


@pytest.mark.parametrize("window", [0, 1, 2, 3, 9])
def test_target_count_is_the_denominator_of_target_loss(window):
    """A client group splits a batch by it: it must count what target_log_likelihood counts."""
    from fedalign_dist.data.task import target_count
    labels = torch.tensor([[IGNORE, 5, 6, IGNORE, 7], [IGNORE, IGNORE, IGNORE, 8, IGNORE]])
    keep = labels.shape[1] if window == 0 else min(window, labels.shape[1])
    _, counted = target_log_likelihood(torch.zeros(2, keep, 10), labels)
    assert target_count(labels, window) == int(counted.sum())
