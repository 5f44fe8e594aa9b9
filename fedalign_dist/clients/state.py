"""Per-client state between rounds (named tensors), held in memory or on disk.

On disk, each (client, key) is one safetensors file written atomically, so thousands of
clients cost disk, not memory: only the round's sampled clients are ever loaded.
Checkpoints use the same layout (client_XXXXXX/KEY.safetensors), independent of the world
size, so a run can resume with clients hosted elsewhere.
"""
from __future__ import annotations

import hashlib
import os
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

    def export_to(self, folder: Path) -> dict[str, str]:
        """Write every entry under `folder` in the checkpoint layout, each file synced; returns
        {path relative to folder's parent: sha256} for the checkpoint's manifest."""
        digests = {}
        for client_id, key in self.entries():
            target = entry_path(folder, client_id, key)
            target.parent.mkdir(parents=True, exist_ok=True)
            digests[_relative(target, folder)] = _write_synced(
                target, save_bytes({n: t.contiguous() for n, t in self.get(client_id, key).items()}))
        return digests

    def import_from(self, folder: Path, client_ids: set[int]) -> None:
        """Load the entries of `client_ids` from a checkpoint folder."""
        for client_id, key, path in scan_entries(folder):
            if client_id in client_ids:
                self.put(client_id, key, load_file(path))


def _relative(path: Path, folder: Path) -> str:
    return str(Path(folder.name) / path.relative_to(folder))


def _write_synced(path: Path, data: bytes) -> str:
    """Write `data` to `path` durably (fsync); its sha256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def entry_path(folder: Path, client_id: int, key: str) -> Path:
    return Path(folder) / f"client_{client_id:06d}" / f"{key}.safetensors"


def scan_entries(folder: Path) -> list[tuple[int, str, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [(int(path.parent.name.removeprefix("client_")), path.name.removesuffix(".safetensors"), path)
            for path in sorted(folder.glob("client_*/*.safetensors"))]


class MemoryClientStore(ClientStore):
    def __init__(self):
        self._data: dict[tuple[int, str], NamedTensors] = {}

    def get(self, client_id, key):
        return self._data.get((client_id, key))

    def put(self, client_id, key, tensors):
        self._data[(client_id, key)] = {n: t.detach().cpu().clone() for n, t in tensors.items()}

    def drop(self, client_id, key):
        self._data.pop((client_id, key), None)

    def entries(self):
        return sorted(self._data)

    def keys_of(self, client_id):
        return sorted(key for client, key in self._data if client == client_id)


class DiskClientStore(ClientStore):
    """Each entry's sha256 is taken once, from the bytes written, and the file is synced once,
    at the first checkpoint after it was written: a checkpoint hashes and syncs only the
    entries changed since the previous one (unchanged ones are hard links with known digests)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._digests: dict[tuple[int, str], str] = {}
        self._unsynced: set[tuple[int, str]] = set()

    def _path(self, client_id: int, key: str) -> Path:
        return entry_path(self.root, client_id, key)

    def get(self, client_id, key):
        path = self._path(client_id, key)
        return load_file(path) if path.exists() else None

    def put(self, client_id, key, tensors):
        path = self._path(client_id, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        data = save_bytes({n: t.detach().cpu().contiguous() for n, t in tensors.items()})
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._digests[(client_id, key)] = hashlib.sha256(data).hexdigest()
        self._unsynced.add((client_id, key))

    def drop(self, client_id, key):
        self._path(client_id, key).unlink(missing_ok=True)
        self._digests.pop((client_id, key), None)
        self._unsynced.discard((client_id, key))

    def entries(self):
        return [(client_id, key) for client_id, key, _ in scan_entries(self.root)]

    def keys_of(self, client_id):
        folder = entry_path(self.root, client_id, "x").parent
        return sorted(p.name.removesuffix(".safetensors") for p in folder.glob("*.safetensors"))

    def export_to(self, folder):
        # Entries are replaced by rename, never rewritten in place, so a hard link is a
        # true snapshot; it costs no copy for thousands of clients.
        digests = {}
        for client_id, key, path in scan_entries(self.root):
            entry = (client_id, key)
            if entry in self._unsynced or entry not in self._digests:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                if entry not in self._digests:  # written by an earlier process: hashed once here
                    self._digests[entry] = hashlib.sha256(path.read_bytes()).hexdigest()
            target = entry_path(folder, client_id, key)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
                with open(target, "rb") as f:
                    os.fsync(f.fileno())
            digests[_relative(target, folder)] = self._digests[entry]
        self._unsynced.clear()
        return digests


def make_client_store(kind: str, root: str | Path) -> ClientStore:
    return DiskClientStore(root) if kind == "disk" else MemoryClientStore()
