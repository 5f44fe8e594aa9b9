"""A checkpoint hashes and syncs only the client states written since the previous one; its
manifest still names every file with its true digest."""
import hashlib

import torch

from fedalign_dist import checkpoint
from fedalign_dist.clients.state import DiskClientStore, MemoryClientStore


def _checkpoint(run_dir, store, round_idx):
    staging = checkpoint.begin_checkpoint(run_dir, round_idx)
    staged = store.export_to(staging / "clients")
    return checkpoint.commit_checkpoint(run_dir, round_idx, {"w": torch.ones(3)}, {"k": 1}, keep=2,
                                        client_files=[staged])


def test_unchanged_client_files_are_not_hashed_again_and_the_manifest_is_true(tmp_path, monkeypatch):
    store = DiskClientStore(tmp_path / "clients" / "rank0")
    for client in range(20):
        store.put(client, "personal", {"e|0": torch.full((4, 4), float(client))})
    _checkpoint(tmp_path, store, 0)
    store.put(3, "personal", {"e|0": torch.zeros(4, 4)})
    hashed = []
    real = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.append(path.name) or real(path))
    folder = _checkpoint(tmp_path, store, 1)
    monkeypatch.setattr(checkpoint, "_sha256", real)
    assert sorted(hashed) == ["global.safetensors", "strategy.json", "strategy.safetensors"]
    assert checkpoint.verify_checkpoint(folder) is None
    meta = (folder / "meta.json").read_text()
    changed = folder / "clients" / "client_000003" / "personal.safetensors"
    assert hashlib.sha256(changed.read_bytes()).hexdigest() in meta
    assert len(list((folder / "clients").rglob("*.safetensors"))) == 20


def test_a_state_damaged_after_it_was_written_is_caught_at_resume(tmp_path):
    store = DiskClientStore(tmp_path / "clients" / "rank0")
    store.put(0, "personal", {"e|0": torch.ones(8)})
    path = tmp_path / "clients" / "rank0" / "client_000000" / "personal.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # the digest was taken from the bytes put() wrote
    folder = _checkpoint(tmp_path, store, 0)
    assert "does not match its checksum" in checkpoint.verify_checkpoint(folder)


def test_memory_store_export_gives_the_digests_of_what_it_wrote(tmp_path):
    store = MemoryClientStore()
    store.put(5, "personal", {"e|1": torch.arange(6.0)})
    folder = _checkpoint(tmp_path, store, 0)
    assert checkpoint.verify_checkpoint(folder) is None
    assert (folder / "clients" / "client_000005" / "personal.safetensors").is_file()
