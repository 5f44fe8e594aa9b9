"""What scoring every label from the prompt's shared KV cache saves over one full sequence per
label (the previous evaluation), on the demo workload: the tiny Mixtral preset, GPT-2 tokens,
sequences of 64, BBC News' 5 topics, evaluation batch 32. Both paths alternate in one run
(the machine is noisy: compare the ratio), and their log-likelihoods are compared.

    python bench/eval_scoring_report.py [--examples 256] [--repeats 3]      # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedalign_dist.config import load_config  # noqa: E402
from fedalign_dist.data.federated import build_federated_data  # noqa: E402
from fedalign_dist.data.task import IGNORE, left_pad, target_log_likelihood  # noqa: E402
from fedalign_dist.data.tokenizer import build_tokenizer  # noqa: E402
from fedalign_dist.models.build import build_model  # noqa: E402


def one_sequence_per_label(model, task, prompts):
    seqs = [p + a for p in prompts for a in task.answers]
    targets = [[IGNORE] * len(p) + a for p in prompts for a in task.answers]
    batch = left_pad(seqs, targets, task.tok.pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=task.window).logits
    return target_log_likelihood(logits, batch["labels"])[0].view(len(prompts), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/demo.yaml", ["strategy.name=fedavg"])
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    data = build_federated_data(cfg.data, cfg.fed.num_clients, cfg.seed, tokenizer)
    model, _ = build_model(cfg, tokenizer)
    model.eval()
    task = data.task
    prompts = [ex["prompt"] for ex in data.examples_at(data.pooled("test")[:args.examples])]
    batch = cfg.eval.batch_size
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    seconds = {"one sequence per label": [], "shared prompt cache": []}
    diff = 0.0
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            old = [one_sequence_per_label(model, task, c) for c in chunks]
            t1 = time.perf_counter()
            new = [task.label_log_likelihoods(model, c, torch.device("cpu"))[0] for c in chunks]
            t2 = time.perf_counter()
            seconds["one sequence per label"].append(t1 - t0)
            seconds["shared prompt cache"].append(t2 - t1)
            diff = max(diff, max(float((a - b).abs().max()) for a, b in zip(old, new)))
    print(f"{len(prompts)} test examples x {len(task.answers)} labels, batch {batch}, 1 thread, "
          f"{args.repeats} alternated repeats\n")
    print("| scoring | seconds (min of repeats) | ms per example |")
    print("|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {min(values):.2f} | {1000 * min(values) / len(prompts):.1f} |")
    ratio = min(seconds["shared prompt cache"]) / min(seconds["one sequence per label"])
    print(f"\nshared / per-label time: {ratio:.2f}; largest |difference| of a log-likelihood: {diff:.2e}")


if __name__ == "__main__":
    main()
