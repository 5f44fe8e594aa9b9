"""Per-client state between rounds (named tensors), held in memory or on disk.

On disk, each (client, key) is one safetensors file written atomically, so thousands of
clients cost disk, not memory: only the round's sampled clients are ever loaded.
Checkpoints use the same layout (client_XXXXXX/KEY.safetensors), independent of the world
size, so a run can resume with clients hosted elsewhere.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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

    def export_to(self, folder: Path) -> None:
        """Write every entry under `folder` in the checkpoint layout."""
        for client_id, key in self.entries():
            target = entry_path(folder, client_id, key)
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file({n: t.contiguous() for n, t in self.get(client_id, key).items()}, str(target))

    def import_from(self, folder: Path, client_ids: set[int]) -> None:
        """Load the entries of `client_ids` from a checkpoint folder."""
        for client_id, key, path in scan_entries(folder):
            if client_id in client_ids:
                self.put(client_id, key, load_file(path))


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
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int, key: str) -> Path:
        return entry_path(self.root, client_id, key)

    def get(self, client_id, key):
        path = self._path(client_id, key)
        return load_file(path) if path.exists() else None

    def put(self, client_id, key, tensors):
        path = self._path(client_id, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def drop(self, client_id, key):
        self._path(client_id, key).unlink(missing_ok=True)

    def entries(self):
        return [(client_id, key) for client_id, key, _ in scan_entries(self.root)]

    def keys_of(self, client_id):
        folder = entry_path(self.root, client_id, "x").parent
        return sorted(p.name.removesuffix(".safetensors") for p in folder.glob("*.safetensors"))

    def export_to(self, folder):
        # Entries are replaced by rename, never rewritten in place, so a hard link is a
        # true snapshot; it costs no copy for thousands of clients.
        for client_id, key, path in scan_entries(self.root):
            target = entry_path(folder, client_id, key)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


def make_client_store(kind: str, root: str | Path) -> ClientStore:
    return DiskClientStore(root) if kind == "disk" else MemoryClientStore()
