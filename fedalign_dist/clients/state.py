"""Per-client state between rounds (named tensors), held in memory or on disk.

On disk, each (client, key) is one safetensors file written atomically, so thousands of
clients cost disk, not memory: only the round's sampled clients are ever loaded.
"""
from __future__ import annotations

import os
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


class MemoryClientStore(ClientStore):
    def __init__(self):
        self._data: dict[tuple[int, str], NamedTensors] = {}

    def get(self, client_id, key):
        return self._data.get((client_id, key))

    def put(self, client_id, key, tensors):
        self._data[(client_id, key)] = {n: t.detach().cpu().clone() for n, t in tensors.items()}

    def drop(self, client_id, key):
        self._data.pop((client_id, key), None)


class DiskClientStore(ClientStore):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int, key: str) -> Path:
        return self.root / f"client_{client_id:06d}" / f"{key}.safetensors"

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


def make_client_store(kind: str, root: str | Path) -> ClientStore:
    return DiskClientStore(root) if kind == "disk" else MemoryClientStore()
