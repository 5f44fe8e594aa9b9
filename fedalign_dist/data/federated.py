"""The federated data set: source -> corpus -> partition over clients -> per-client splits ->
the task's encoded examples.

Built identically on every rank from the seed (cheap: a few thousand short prompts), so no
data moves between ranks. Local training and personalised evaluation read only the splits of
the clients a rank hosts; the global evaluation reads a shard of every client's evaluation
split (a simulation shortcut: in a real deployment it would run on held-out server data)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedalign_dist.data import partition as part
from fedalign_dist.data.registry import source_class, task_class
from fedalign_dist.data.sources import Corpus
from fedalign_dist.data.task import TaskType


@dataclass
class FederatedData:
    task: TaskType
    examples: list[dict]
    """Every example as the task encoded it."""
    labels: np.ndarray | None
    """Class index of every example, or None for unlabelled data."""
    clients: list[dict[str, np.ndarray]]
    """Per client: indices of its train / val / test examples."""
    label_names: list[str] | None

    def num_train(self, client_id: int) -> int:
        return len(self.clients[client_id]["train"])

    def examples_at(self, indices: Sequence[int]) -> list[dict]:
        return [self.examples[i] for i in indices]

    def pooled(self, split: str) -> np.ndarray:
        return np.concatenate([c[split] for c in self.clients])

    def describe(self, source: str) -> dict:
        """The run folder's data.json: what was trained on, and every client's split sizes."""
        return {"source": source, "task": self.task.name, "metrics": list(self.task.metrics),
                "examples": len(self.examples),
                "label_names": self.label_names,
                "clients": [{split: len(idx) for split, idx in c.items()} for c in self.clients]}

    def label_table(self, split: str = "train") -> np.ndarray:
        if self.labels is None:
            raise part.PartitionError("this data set has no labels: there is no label table to show")
        return part.label_table([c[split] for c in self.clients], self.labels, len(self.label_names))


def load_source(data_cfg) -> Corpus:
    corpus = source_class(data_cfg.name)(data_cfg).load()
    if not isinstance(corpus, Corpus):
        raise TypeError(f"data source '{data_cfg.name}': load() must return a fedalign_dist.data.sources.Corpus, "
                        f"got {type(corpus).__name__}")
    if not corpus.texts:
        raise ValueError(f"data source '{data_cfg.name}' returned no examples")
    return corpus


def build_federated_data(data_cfg, num_clients: int, seed: int, tokenizer) -> FederatedData:
    corpus = load_source(data_cfg)
    task_type = task_class(data_cfg.task)
    task_type.check_corpus(corpus, data_cfg.name)
    n = len(corpus.texts)
    rows = np.arange(n)
    if data_cfg.max_examples is not None and data_cfg.max_examples < n:
        rows = np.sort(np.random.default_rng([seed, 0x5B5]).choice(n, data_cfg.max_examples, replace=False))
    # plain columns, not a datasets.Dataset: that would cost every rank ~90 MB of pyarrow and
    # pandas to pick rows of a list
    columns = {k: [v[i] for i in rows] for k, v in {"text": corpus.texts, "label": corpus.labels,
                                                     "group": corpus.groups, "response": corpus.responses}.items()
               if v is not None}
    task = task_type(tokenizer, corpus, data_cfg, seed)
    encoded = [task.encode({**{k: v[i] for k, v in columns.items()}, "id": i}) for i in range(len(rows))]
    labels = np.asarray(columns["label"], dtype=np.int64) if corpus.labels is not None else None
    groups = np.asarray(columns["group"]) if corpus.groups is not None else None
    parts = part.partition(labels, groups, len(rows), num_clients, data_cfg.partition, seed,
                           alpha=data_cfg.alpha, shards_per_client=data_cfg.shards_per_client,
                           min_size=data_cfg.min_client_examples, source=data_cfg.name,
                           per_client=data_cfg.examples_per_client)
    split_rng = np.random.default_rng([seed, 0x5911])
    clients = [part.split_client(p, data_cfg.val_fraction, data_cfg.test_fraction, split_rng) for p in parts]
    return FederatedData(task, encoded, labels, clients, corpus.label_names)
