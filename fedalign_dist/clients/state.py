"""Per-client state between rounds (named tensors), held in memory or on disk.

On disk, each (client, key) is one safetensors file written atomically, so thousands of
clients cost disk, not memory: only the round's sampled clients are ever loaded.
Checkpoints index every (client, key) by the sha256 of its file in a pool of blobs shared
by all checkpoints (checkpoint.py), independent of the world size, so a run can resume with
clients hosted elsewhere.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

NamedTensors = dict[str, torch.Tensor]


class ClientStore:
    def get(self, client_id: int, key: str) -> NamedTensors | None:
        raise NotImplementedError

    def put(self, client_id: int, key: str, tensors: NamedTensors) -> None:
        raise NotImplementedError

    def drop(self, client_id: int, key: str) -> None:
        raise NotImplementedError

    def entries(self) -> list[tuple[int, str]]:
        raise NotImplementedError

    def keys_of(self, client_id: int) -> list[str]:
        """The keys this store holds for one client."""
        raise NotImplementedError

    def clear(self) -> None:
        for client_id, key in self.entries():
            self.drop(client_id, key)

    def export_to(self, blobs: Path) -> dict[str, str]:
        """Put the contents of the entries changed since the last export into the checkpoint
        blob pool `blobs` (each file named by its sha256, synced); returns
        {"client_XXXXXX/KEY": sha256} of every entry."""
        raise NotImplementedError

    def import_from(self, checkpoint_folder: Path, client_ids: set[int]) -> None:
        """Load the entries of `client_ids` from a committed checkpoint."""
        from fedalign_dist.checkpoint import client_entries
        for (client_id, key), (path, _) in client_entries(checkpoint_folder).items():
            if client_id in client_ids:
                self.put(client_id, key, load_file(path))


def entry_name(client_id: int, key: str) -> str:
    return f"client_{client_id:06d}/{key}"


def _write_blob(blobs: Path, digest: str, data: bytes) -> None:
    """The pool's file for `digest`, written durably unless it is already there."""
    from fedalign_dist.checkpoint import blob_path
    path = blob_path(blobs, digest)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # the ranks of a client group hold the same personal state and write the same blob: each
    # through a name of its own, and whichever rename lands last leaves the same bytes
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _link_blob(blobs: Path, digest: str, source: Path) -> None:
    """The pool's file for `digest` as a hard link to `source` (synced); copied where the
    file system has no links. Entries are replaced by rename, never rewritten in place, so
    a link is a true snapshot."""
    from fedalign_dist.checkpoint import blob_path
    with open(source, "rb") as f:
        os.fsync(f.fileno())
    path = blob_path(blobs, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, path)
    except FileExistsError:
        return  # the same contents, pooled before
    except OSError:
        _write_blob(blobs, digest, source.read_bytes())


def entry_path(folder: Path, client_id: int, key: str) -> Path:
    return Path(folder) / f"client_{client_id:06d}" / f"{key}.safetensors"


def scan_entries(folder: Path) -> list[tuple[int, str, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [(int(path.parent.name.removeprefix("client_")), path.name.removesuffix(".safetensors"), path)
            for path in sorted(folder.glob("client_*/*.safetensors"))]


class ShardView:
    """What a client's start state reads under client groups, where this rank holds one shard of
    the global state: each record's entries of that shard (`keep(entries)`), read-only."""

    def __init__(self, store: ClientStore, keep):
        self.store, self.keep = store, keep

    def get(self, client_id: int, key: str) -> NamedTensors | None:
        entries = self.store.get(client_id, key)
        return None if entries is None else self.keep(entries)


class MemoryClientStore(ClientStore):
    def __init__(self):
        self._data: dict[tuple[int, str], NamedTensors] = {}
        self._pooled: dict[tuple[int, str], str] = {}  # sha256 of entries exported unchanged since

    def get(self, client_id, key):
        return self._data.get((client_id, key))

    def put(self, client_id, key, tensors):
        self._data[(client_id, key)] = {n: t.detach().cpu().clone() for n, t in tensors.items()}
        self._pooled.pop((client_id, key), None)

    def drop(self, client_id, key):
        self._data.pop((client_id, key), None)
        self._pooled.pop((client_id, key), None)

    def entries(self):
        return sorted(self._data)

    def keys_of(self, client_id):
        return sorted(key for client, key in self._data if client == client_id)

    def export_to(self, blobs):
        for entry in self.entries():
            if entry not in self._pooled:
                data = save_bytes({n: t.contiguous() for n, t in self._data[entry].items()})
                self._pooled[entry] = hashlib.sha256(data).hexdigest()
                _write_blob(Path(blobs), self._pooled[entry], data)
        return {entry_name(*entry): self._pooled[entry] for entry in self.entries()}


class DiskClientStore(ClientStore):
    """Each entry's sha256 is taken once, from the bytes written, and the file is synced and
    linked into the checkpoint pool once, at the first checkpoint after it was written. The
    index of entries is kept in memory: listing them touches no file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # entries left by an earlier process: digests taken when first exported
        self._digests: dict[tuple[int, str], str | None] = {
            (client_id, key): None for client_id, key, _ in scan_entries(self.root)}
        self._unpooled: set[tuple[int, str]] = set(self._digests)

    def _path(self, client_id: int, key: str) -> Path:
        return entry_path(self.root, client_id, key)

    def get(self, client_id, key):
        if (client_id, key) not in self._digests:
            return None
        return load_file(self._path(client_id, key))

    def put(self, client_id, key, tensors):
        path = self._path(client_id, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        data = save_bytes({n: t.detach().cpu().contiguous() for n, t in tensors.items()})
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._digests[(client_id, key)] = hashlib.sha256(data).hexdigest()
        self._unpooled.add((client_id, key))

    def drop(self, client_id, key):
        self._path(client_id, key).unlink(missing_ok=True)
        self._digests.pop((client_id, key), None)
        self._unpooled.discard((client_id, key))

    def entries(self):
        return sorted(self._digests)

    def keys_of(self, client_id):
        folder = entry_path(self.root, client_id, "x").parent
        return sorted(p.name.removesuffix(".safetensors") for p in folder.glob("*.safetensors"))

    def import_from(self, checkpoint_folder, client_ids):
        # a pooled blob is linked in, not rewritten: it is already synced and hashed
        from fedalign_dist.checkpoint import client_entries
        for (client_id, key), (source, digest) in client_entries(checkpoint_folder).items():
            if client_id not in client_ids:
                continue
            path = self._path(client_id, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            try:
                os.link(source, path)
            except OSError:
                shutil.copyfile(source, path)
            self._digests[(client_id, key)] = digest
            if digest is None:  # an earlier version's checkpoint: hashed when first exported
                self._unpooled.add((client_id, key))

    def export_to(self, blobs):
        for entry in sorted(self._unpooled):
            path = self._path(*entry)
            if self._digests[entry] is None:
                self._digests[entry] = hashlib.sha256(path.read_bytes()).hexdigest()
            _link_blob(Path(blobs), self._digests[entry], path)
        self._unpooled.clear()
        return {entry_name(*entry): digest for entry, digest in sorted(self._digests.items())}


def make_client_store(kind: str, root: str | Path) -> ClientStore:
    return DiskClientStore(root) if kind == "disk" else MemoryClientStore()
