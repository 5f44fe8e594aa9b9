"""Which rank of a client group aggregates which tensors (fed.ranks_per_client=G > 1).

Shards are whole named tensors, not flat ranges: a strategy's per-expert and per-router-row
weights then apply to a shard exactly as to the whole state (a fused expert tensor stays in one
piece), so every strategy aggregates a shard unchanged. Balanced by elements: the largest
tensor first, each to the least-loaded rank (ties: the lower rank), the same on every rank."""
from __future__ import annotations


def assign_shards(sizes: dict[str, int], parts: int) -> dict[str, int]:
    """{tensor name: the group rank that aggregates it} for tensors of `sizes` elements."""
    if parts < 1:
        raise ValueError(f"cannot split tensors into {parts} shards")
    load = [0] * parts
    owner = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        part = min(range(parts), key=lambda p: (load[p], p))
        owner[name] = part
        load[part] += sizes[name]
    return {name: owner[name] for name in sizes}


def shard_of(owner: dict[str, int], part: int) -> list[str]:
    """The names `part` aggregates, in the state's order."""
    return [name for name, p in owner.items() if p == part]


def entry_owner(owner: dict[str, int], key: str) -> int:
    """The group rank that keeps a client-state entry up to date: per-expert entries are
    keyed `name|expert`, others by the tensor name; anything else stays with rank 0."""
    if key in owner:
        return owner[key]
    name = key.rsplit("|", 1)[0]
    return owner.get(name, 0)


def owned_entries(entries: dict, owner: dict[str, int], part: int) -> dict:
    """The entries of a client-state record that rank `part` of the group keeps up to date."""
    return {key: value for key, value in entries.items() if entry_owner(owner, key) == part}
