"""Aggregation by shard (client groups): shards are whole tensors, balanced, and every
strategy aggregating each shard alone gives exactly its whole-state aggregation, personal
experts included once each shard's owned entries are merged."""
import dataclasses

import pytest
import torch

from fedalign_dist.aggregation.shards import assign_shards, entry_owner, owned_entries, shard_of
from fedalign_dist.clients.state import MemoryClientStore
from fedalign_dist.strategies.expertwise import PERSONAL_KEY
from tests.unit.test_fedalign_strategy import COMM, _misaligned_round, _strategy, _updates, layout  # noqa: F401


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_every_tensor_has_one_owner_and_the_loads_are_balanced(parts):
    sizes = {f"t{i}": size for i, size in enumerate([900, 40, 500, 500, 7, 300, 300, 1, 64, 64, 200])}
    owner = assign_shards(sizes, parts)
    assert owner.keys() == sizes.keys() and set(owner.values()) <= set(range(parts))
    loads = [sum(sizes[n] for n in shard_of(owner, p)) for p in range(parts)]
    assert max(loads) - min(loads) <= max(sizes.values())  # greedy, largest first
    assert owner == assign_shards(dict(reversed(list(sizes.items()))), parts), "depends on the order given"
    with pytest.raises(ValueError):
        assign_shards(sizes, 0)


def test_entries_are_owned_by_their_tensors_rank():
    owner = {"a.weight": 1, "b.weight": 0}
    assert entry_owner(owner, "a.weight|3") == 1 and entry_owner(owner, "a.weight") == 1
    assert entry_owner(owner, "b.weight|0") == 0 and entry_owner(owner, "unknown") == 0
    assert owned_entries({"a.weight|0": 1, "b.weight|2": 2, "a.weight": 3}, owner, 1) == {
        "a.weight|0": 1,
        "a.weight": 3,
    }


def _by_shards(layout, parts, name, overrides, updates):
    """(whole aggregation, whole store), (the shards' aggregations joined, the owned entries merged)."""
    anatomy, state = layout
    whole_store, shard_stores = MemoryClientStore(), [MemoryClientStore() for _ in range(parts)]
    whole, _ = _strategy(layout, name, *overrides, store=whole_store).aggregate(state, updates, COMM)
    owner = assign_shards({n: t.numel() for n, t in state.items()}, parts)
    joined, merged = {}, {}
    for part, store in enumerate(shard_stores):
        names = shard_of(owner, part)
        mine = [dataclasses.replace(u, delta={n: u.delta[n] for n in names}) for u in updates]
        new, _ = _strategy(layout, name, *overrides, store=store).aggregate({n: state[n] for n in names}, mine, COMM)
        assert new.keys() == set(names)
        joined.update(new)
        for client, key in store.entries():
            merged.setdefault((client, key), {}).update(owned_entries(store.get(client, key), owner, part))
    return (whole, whole_store), (joined, merged)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("name, overrides", [
    ("fedavg", []), ("fedprox", []), ("fedmoe", []), ("fedalign", []),
    ("fedalign", ["strategy.fedalign.comm=allgather", "strategy.fedalign.mode=pairwise"]),
    ("fedalign", ["strategy.fedalign.match=true"])])
def test_each_shard_aggregated_alone_equals_the_whole_aggregation(layout, parts, name, overrides):
    anatomy, state = layout
    updates = _misaligned_round(state, anatomy) if name == "fedalign" else _updates(state, 4, seed=3)
    (whole, whole_store), (joined, merged) = _by_shards(layout, parts, name, overrides, updates)
    assert joined.keys() == whole.keys()
    for n in whole:
        assert torch.equal(joined[n], whole[n]), n
    if name == "fedalign" and "strategy.fedalign.match=true" not in overrides:  # matched, client 2 keeps none
        assert whole_store.get(2, PERSONAL_KEY), "the test needs a client with personal experts"
    assert set(merged) == set(whole_store.entries())
    for (client, key), entries in merged.items():
        expected = whole_store.get(client, key)
        assert entries.keys() == expected.keys()
        assert all(torch.equal(entries[k], expected[k]) for k in expected)


def test_gathered_statistics_pass_within_a_group_exactly():
    """Under client groups a group's first rank passes the gathered statistics to its partners
    as bytes: every item comes back with its names, dtypes and values, empty hosts included."""
    from fedalign_dist.distributed.sharded_aggregation import _item_bytes, _items_from_bytes
    gen = torch.Generator().manual_seed(0)
    parts = [
        [{"client_id": torch.tensor(3), "usage": torch.rand(2, 4, generator=gen), "held": torch.tensor([True, False])}],
        [],
        [
            {
                "client_id": torch.tensor(5),
                "usage": torch.rand(2, 4, generator=gen).double(),
                "held": torch.tensor([False, True]),
            }
        ],
    ]
    back = _items_from_bytes(_item_bytes(parts))
    assert [len(part) for part in back] == [1, 0, 1]
    for part, again in zip(parts, back):
        for item, copy in zip(part, again):
            assert list(copy) == list(item)
            assert all(copy[k].dtype == item[k].dtype and torch.equal(copy[k], item[k]) for k in item)
    assert _items_from_bytes(_item_bytes([[], []])) == [[], []]
