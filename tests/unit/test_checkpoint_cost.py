"""Client states live in a pool of blobs named by their sha256, shared by the checkpoints that
hold them: a checkpoint writes, hashes and syncs only the states changed since the previous
one; its manifest and index still name every state with its true digest; a blob goes with
the last checkpoint naming it."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from fedalign_dist import checkpoint
from fedalign_dist.clients.state import DiskClientStore, MemoryClientStore


def _checkpoint(run_dir, store, round_idx, keep=2):
    checkpoint.begin_checkpoint(run_dir, round_idx)
    entries = store.export_to(checkpoint.blob_dir(run_dir))
    checkpoint.stage_client_part(run_dir, round_idx, 0, entries)
    return checkpoint.commit_checkpoint(run_dir, round_idx, {"w": torch.ones(3)}, {"k": 1}, keep=keep)


def _blobs(run_dir):
    return sorted(p.name for p in checkpoint.blob_dir(run_dir).glob("*/*.safetensors"))


def _state(value):
    return {"e|0": torch.full((4, 4), float(value))}


def test_a_checkpoint_touches_only_the_changed_states_and_its_index_is_true(tmp_path, monkeypatch):
    store = DiskClientStore(tmp_path / "clients" / "rank0")
    for client in range(20):
        store.put(client, "personal", _state(client))
    _checkpoint(tmp_path, store, 0)
    assert len(_blobs(tmp_path)) == 20
    store.put(3, "personal", _state(-1))
    hashed, linked = [], []
    real_sha, real_link = checkpoint._sha256, __import__("os").link
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.append(path.name) or real_sha(path))
    monkeypatch.setattr("os.link", lambda src, dst: linked.append(dst) or real_link(src, dst))
    folder = _checkpoint(tmp_path, store, 1)
    monkeypatch.undo()
    assert sorted(hashed) == ["global.safetensors", "rank_00000.json", "strategy.json", "strategy.safetensors"]
    assert len(linked) == 1 and len(_blobs(tmp_path)) == 21
    # the checkpoint's own folder holds a handful of files, whatever the number of clients
    assert len([p for p in folder.rglob("*") if p.is_file()]) == 5
    assert checkpoint.verify_checkpoint(folder) is None
    entries = checkpoint.client_entries(folder)
    assert len(entries) == 20
    path, digest = entries[(3, "personal")]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert torch.equal(load_file(path)["e|0"], _state(-1)["e|0"])


def test_a_blob_goes_with_the_last_checkpoint_that_names_it(tmp_path):
    store = DiskClientStore(tmp_path / "clients" / "rank0")
    store.put(0, "personal", _state(0))
    store.put(1, "personal", _state(1))
    first = _checkpoint(tmp_path, store, 0)
    old_digest = checkpoint.client_entries(first)[(0, "personal")][1]
    store.put(0, "personal", _state(5))
    _checkpoint(tmp_path, store, 1)
    assert len(_blobs(tmp_path)) == 3  # round 0 is still kept: its blob stays
    store.put(1, "personal", _state(6))
    last = _checkpoint(tmp_path, store, 2)
    assert not first.exists() and f"{old_digest}.safetensors" not in _blobs(tmp_path)
    assert len(_blobs(tmp_path)) == 3 and checkpoint.verify_checkpoint(last) is None
    # a blob staged by a checkpoint that never committed is swept; named ones stay
    store.put(7, "personal", _state(7))
    store.export_to(checkpoint.blob_dir(tmp_path))
    assert len(_blobs(tmp_path)) == 4
    assert checkpoint.sweep_blobs(tmp_path) == 1 and len(_blobs(tmp_path)) == 3


def test_a_state_damaged_after_it_was_written_is_caught_at_resume(tmp_path):
    store = DiskClientStore(tmp_path / "clients" / "rank0")
    store.put(0, "personal", {"e|0": torch.ones(8)})
    path = tmp_path / "clients" / "rank0" / "client_000000" / "personal.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # the digest was taken from the bytes put() wrote
    folder = _checkpoint(tmp_path, store, 0)
    assert "client 0's personal state" in checkpoint.verify_checkpoint(folder)
    assert "does not match its checksum" in checkpoint.verify_checkpoint(folder)


def test_a_missing_blob_makes_the_checkpoint_unusable(tmp_path):
    store = MemoryClientStore()
    store.put(5, "personal", {"e|1": torch.arange(6.0)})
    folder = _checkpoint(tmp_path, store, 0)
    assert checkpoint.verify_checkpoint(folder) is None
    path, _ = checkpoint.client_entries(folder)[(5, "personal")]
    path.unlink()
    assert "is missing" in checkpoint.verify_checkpoint(folder)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_store_resumes_what_it_exported_and_exports_it_again_without_rewriting(tmp_path, kind):
    first = MemoryClientStore() if kind == "memory" else DiskClientStore(tmp_path / "a")
    for client in range(4):
        first.put(client, "personal", _state(client))
    folder = _checkpoint(tmp_path, first, 0)
    second = MemoryClientStore() if kind == "memory" else DiskClientStore(tmp_path / "b")
    second.import_from(folder, {1, 3})
    assert second.entries() == [(1, "personal"), (3, "personal")]
    assert torch.equal(second.get(3, "personal")["e|0"], _state(3)["e|0"])
    before = {p: p.stat().st_mtime_ns for p in checkpoint.blob_dir(tmp_path).rglob("*.safetensors")}
    again = second.export_to(checkpoint.blob_dir(tmp_path))
    assert again == {f"client_{c:06d}/{key}": digest
                     for (c, key), (_, digest) in checkpoint.client_entries(folder).items() if c in (1, 3)}
    assert {p: p.stat().st_mtime_ns for p in checkpoint.blob_dir(tmp_path).rglob("*.safetensors")} == before


def test_checkpoints_of_earlier_versions_still_load(tmp_path):
    """Before the pool, a checkpoint held its client states as clients/client_XXXXXX/KEY.safetensors."""
    folder = checkpoint.checkpoint_dir(tmp_path, 0)
    (folder / "clients" / "client_000002").mkdir(parents=True)
    from safetensors.torch import save_file
    save_file(_state(2), str(folder / "clients" / "client_000002" / "personal.safetensors"))
    save_file({"w": torch.ones(3)}, str(folder / "global.safetensors"))
    checkpoint.save_strategy_state(folder, {})
    files = {str(p.relative_to(folder)): checkpoint._sha256(p) for p in folder.rglob("*") if p.is_file()}
    (folder / "meta.json").write_text(json.dumps({"round": 0, "files": files}))
    assert checkpoint.verify_checkpoint(folder) is None
    store = DiskClientStore(tmp_path / "store")
    store.import_from(folder, {2})
    assert torch.equal(store.get(2, "personal")["e|0"], _state(2)["e|0"])
    digest = hashlib.sha256((folder / "clients/client_000002/personal.safetensors").read_bytes()).hexdigest()
    assert store.export_to(checkpoint.blob_dir(tmp_path)) == {"client_000002/personal": digest}


def test_a_global_state_written_by_shards_reads_back_by_name_in_the_order_asked(tmp_path):
    """Client groups write one file per shard; a rank of any group size reads the tensors it
    holds, in its own order (a file lists them sorted), and another model's names are refused."""
    from safetensors.torch import save_file
    folder = checkpoint.checkpoint_dir(tmp_path, 0)
    folder.mkdir(parents=True)
    whole = {"z.weight": torch.arange(6.0).view(2, 3), "a.weight": torch.ones(4), "m.bias": torch.full((2,), 7.0)}
    save_file({"z.weight": whole["z.weight"]}, str(folder / "global.part000-of-002.safetensors"))
    save_file(
        {"a.weight": whole["a.weight"], "m.bias": whole["m.bias"]}, str(folder / "global.part001-of-002.safetensors")
    )
    checkpoint.save_strategy_state(folder, {})
    (folder / "meta.json").write_text(json.dumps({"round": 4, "files": {}}))
    done, state, _ = checkpoint.load_checkpoint(folder, ["z.weight", "m.bias"])
    assert done == 4 and list(state) == ["z.weight", "m.bias"]
    assert all(torch.equal(state[n], whole[n]) for n in state)
    assert checkpoint.load_checkpoint(folder)[1].keys() == whole.keys()
    with pytest.raises(ValueError, match="written for another model"):
        checkpoint.load_checkpoint(folder, ["z.weight", "lm_head.weight"])
