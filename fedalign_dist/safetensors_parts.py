"""One safetensors file written by several processes, each writing the bytes of the tensors it
holds at offsets that every process computes alike from the names, dtypes and shapes: the
client groups' final export writes global.safetensors so, and no process holds the whole
state. The file is the format's own (an 8-byte little-endian header length, the JSON header
padded with spaces to 8 bytes, then the data in the header's order, without holes), so
safetensors' own readers load it."""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fedalign_dist import json_files

# safetensors' names for torch's dtypes (those its own writer takes)
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
               torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64", torch.uint32: "U32",
               torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL"}

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

TensorSpec = tuple[str, list[int]]
"""A tensor as the layout needs it (JSON, to be sent): its dtype's safetensors name and its shape."""


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    if tensor.dtype not in DTYPE_NAMES:
        raise TypeError(f"safetensors_parts does not write {tensor.dtype} tensors")
    return DTYPE_NAMES[tensor.dtype], list(tensor.shape)


@dataclass(frozen=True)
class Layout:
    header: bytes
    """The file's first bytes: the header's length, then the header."""
    spans: dict[str, tuple[int, int]]
    """Each tensor's [start, end) byte offsets in the file."""
    size: int
    """The whole file's length in bytes."""


def layout_of(specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> Layout:
    """The file holding tensors of these specs (pure: the same on every process). As safetensors'
    own writer orders them, wider dtypes first, then by name: every tensor's data is aligned
    to its element size."""
    entries, end = {}, 0
    for name in sorted(specs, key=lambda n: (-DTYPES[specs[n][0]].itemsize, n)):
        dtype, shape = specs[name]
        size = math.prod(shape) * DTYPES[dtype].itemsize
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [end, end + size]}
        end += size
    text = json_files.dumps({"__metadata__": metadata or {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    spans = {name: (start + e["data_offsets"][0], start + e["data_offsets"][1]) for name, e in entries.items()}
    return Layout(struct.pack("<Q", len(text)) + text, spans, start + end)


def write_part(path: Path, layout: Layout, tensors: dict[str, torch.Tensor], header: bool) -> None:
    """Write `tensors` (some of the layout's) at their offsets, and the header if asked; the file
    is created if no process has yet, and nothing another process wrote is touched. Synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if header:
            os.pwrite(fd, layout.header, 0)
        for name, tensor in tensors.items():
            start, end = layout.spans[name]
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != end - start:
                raise ValueError(f"{name}: {data.nbytes} bytes where the layout holds {end - start}")
            written = 0
            while written < data.nbytes:  # pwrite may write less than asked
                written += os.pwrite(fd, memoryview(data)[written:], start + written)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_complete(path: Path, layout: Layout) -> None:
    """Every part written: the file has the layout's length (a missing last part leaves it short)."""
    size = os.path.getsize(path)
    if size != layout.size:
        raise RuntimeError(f"{path} has {size} bytes where its layout holds {layout.size}: a part is missing")
