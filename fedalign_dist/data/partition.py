"""Non-IID partitioners: pure functions from labels (and natural groups) to client index sets."""
from __future__ import annotations

import numpy as np


class PartitionError(ValueError):
    pass


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              min_size: int, max_tries: int = 100) -> list[np.ndarray]:
    """Per class, split its examples over clients in proportions ~ Dir(alpha) (Hsu et al., 2019).
    Redrawn until every client has at least `min_size` examples."""
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise PartitionError(
        f"dirichlet(alpha={alpha}) left a client with fewer than {min_size} examples in {max_tries} "
        f"draws of {len(labels)} examples over {num_clients} clients: raise data.alpha, lower "
        f"fed.num_clients or data.min_client_examples")


def label_shards(labels: np.ndarray, num_clients: int, shards_per_client: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into num_clients*shards_per_client shards, deal them out at random
    (McMahan et al., 2017 pathological non-IID)."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_clients * shards_per_client)
    assignment = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in assignment]


def sampled(labels: np.ndarray | None, num_examples: int, num_clients: int, per_client: int, alpha: float,
            rng: np.random.Generator) -> list[np.ndarray]:
    """Every client draws `per_client` examples from the whole data set, its label mix ~ Dir(alpha)
    (uniform over examples when unlabelled): clients may share examples, so there can be more
    clients than the data could split (systems measurements at 100k clients, not accuracy
    claims). A client's examples are distinct (a repeat drawn is dropped, so it may hold a few
    fewer). Vectorised: 100k clients take about a second."""
    if labels is None:
        drawn = rng.integers(num_examples, size=(num_clients, per_client))
    else:
        classes, class_of = np.unique(labels, return_inverse=True)
        mixes = np.cumsum(rng.dirichlet(np.full(len(classes), alpha), size=num_clients), axis=1)
        wanted = (rng.random((num_clients, per_client))[..., None] > mixes[:, None, :]).sum(-1)
        wanted = np.minimum(wanted, len(classes) - 1)  # a cumulative sum a rounding short of 1
        drawn = np.empty_like(wanted)
        for k in range(len(classes)):
            members, slots = np.flatnonzero(class_of == k), wanted == k
            drawn[slots] = members[rng.integers(len(members), size=int(slots.sum()))]
    drawn.sort(axis=1)
    fresh = np.ones_like(drawn, dtype=bool)
    fresh[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    return [row[keep] for row, keep in zip(drawn.astype(np.int64), fresh)]


def natural(groups: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """One client per natural group (e.g. news outlet)."""
    group_ids = np.unique(groups)
    if len(group_ids) != num_clients:
        raise PartitionError(f"natural partition has {len(group_ids)} groups but fed.num_clients={num_clients}: "
                             f"set fed.num_clients={len(group_ids)}")
    return [np.flatnonzero(groups == g) for g in group_ids]


def partition(labels: np.ndarray | None, groups: np.ndarray | None, num_examples: int, num_clients: int,
              scheme: str, seed: int, alpha: float = 0.5, shards_per_client: int = 2, min_size: int = 1,
              source: str = "the data source", per_client: int | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 0xDA7A])
    if scheme in ("dirichlet", "label_shards") and labels is None:
        raise PartitionError(f"data.partition={scheme} splits by label, but {source} has no labels: use "
                             f"data.partition=iid" + (" or natural" if groups is not None else ""))
    if scheme == "iid":
        parts = iid(num_examples, num_clients, rng)
    elif scheme == "dirichlet":
        parts = dirichlet(labels, num_clients, alpha, rng, min_size)
    elif scheme == "label_shards":
        parts = label_shards(labels, num_clients, shards_per_client, rng)
    elif scheme == "sampled":
        if per_client is None:
            raise PartitionError("data.partition=sampled needs data.examples_per_client")
        parts = sampled(labels, num_examples, num_clients, per_client, alpha, rng)
    elif scheme == "natural":
        if groups is None:
            raise PartitionError(f"data.partition=natural needs each example's natural client, but {source} "
                                 f"gives none (built in: data.name=news_outlets)")
        parts = natural(groups, num_clients)
    else:
        raise PartitionError(f"unknown partition '{scheme}'")
    small = [c for c, p in enumerate(parts) if len(p) < min_size]
    if small:
        raise PartitionError(f"partition '{scheme}' leaves clients {small[:10]} with fewer than {min_size} "
                             f"examples: lower fed.num_clients or data.min_client_examples")
    return parts


def split_client(indices: np.ndarray, val_fraction: float, test_fraction: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-client train / validation / test split (at least one test and one train example)."""
    idx = rng.permutation(indices)
    n_test = max(1, int(round(len(idx) * test_fraction)))
    n_val = int(round(len(idx) * val_fraction))
    if len(idx) - n_test - n_val < 1:
        raise PartitionError(f"a client with {len(idx)} examples cannot be split into train/val/test")
    return {"test": np.sort(idx[:n_test]), "val": np.sort(idx[n_test:n_test + n_val]),
            "train": np.sort(idx[n_test + n_val:])}


def label_table(parts: list[np.ndarray], labels: np.ndarray, num_labels: int) -> np.ndarray:
    """clients x labels example counts."""
    return np.stack([np.bincount(labels[p], minlength=num_labels) for p in parts])
