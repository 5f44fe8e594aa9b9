"""The federated data set: corpus -> partition over clients -> per-client splits -> token ids.

Built identically on every rank from the seed (cheap: a few thousand short prompts), so no
data moves between ranks. Local training and personalised evaluation read only the splits of
the clients a rank hosts; the global evaluation reads a shard of every client's evaluation
split (a simulation shortcut: in a real deployment it would run on held-out server data)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from fedalign_dist.data import partition as part
from fedalign_dist.data.sources import load_corpus
from fedalign_dist.data.task import Task


@dataclass
class FederatedData:
    task: Task
    prompts: list[list[int]]
    labels: np.ndarray
    clients: list[dict[str, np.ndarray]]
    """Per client: indices of its train / val / test examples."""
    label_names: list[str]

    def num_train(self, client_id: int) -> int:
        return len(self.clients[client_id]["train"])

    def pooled(self, split: str) -> np.ndarray:
        return np.concatenate([c[split] for c in self.clients])

    def label_table(self, split: str = "train") -> np.ndarray:
        return part.label_table([c[split] for c in self.clients], self.labels, len(self.label_names))


def build_federated_data(data_cfg, num_clients: int, seed: int, tokenizer) -> FederatedData:
    corpus = load_corpus(data_cfg.name)
    frame = Dataset.from_dict({"text": corpus.texts, "label": corpus.labels,
                               "group": corpus.groups if corpus.groups is not None else [0] * len(corpus.texts)})
    if data_cfg.max_examples is not None and data_cfg.max_examples < len(frame):
        keep = np.random.default_rng([seed, 0x5B5]).choice(len(frame), data_cfg.max_examples, replace=False)
        frame = frame.select(np.sort(keep))
    task = Task(tokenizer, corpus.label_names, data_cfg.max_length)
    frame = frame.map(lambda row: {"prompt": task.encode_prompt(row["text"])}, remove_columns=["text"])
    labels = np.asarray(frame["label"], dtype=np.int64)
    groups = np.asarray(frame["group"]) if corpus.groups is not None else None
    parts = part.partition(labels, groups, num_clients, data_cfg.partition, seed, alpha=data_cfg.alpha,
                           shards_per_client=data_cfg.shards_per_client, min_size=data_cfg.min_client_examples)
    split_rng = np.random.default_rng([seed, 0x5911])
    clients = [part.split_client(p, data_cfg.val_fraction, data_cfg.test_fraction, split_rng) for p in parts]
    return FederatedData(task, list(frame["prompt"]), labels, clients, corpus.label_names)
