"""safetensors files read and written one tensor at a time, without a second copy.

The safetensors library's `load_file` builds a whole state dict beside the module it is
then copied into (two copies of the weights at the peak), and reads through a memory map
whose touched pages count as the process's memory too. Here a file's header is parsed
and each tensor's bytes are read with `readinto` straight into the tensor the module
will keep, so loading a model costs its weights once (tests/core/test_hf_families.py
measures it). Writing streams each tensor's bytes to the file likewise.

The format: 8 bytes little-endian header length N, N bytes of JSON ({name: {dtype,
shape, data_offsets: [begin, end]}, optional "__metadata__"}), then the data, offsets
relative to its start. Only little-endian hosts are supported, as by safetensors itself.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names of the floating-point tensors a model may hold.
DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20


class TensorFileError(ValueError):
    """A tensor file that cannot be read as the safetensors it claims to be."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a file: where its bytes are and what they hold."""

    path: Path
    name: str
    dtype: str              # the safetensors name (F32, BF16, ...)
    shape: tuple[int, ...]
    offset: int             # absolute offset of its first byte in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, from its header only; checks that each
    tensor's byte range lies in the file and fits its dtype and shape."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TensorFileError(f"{path} cannot be read as safetensors: shorter than its header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise TensorFileError(f"{path} cannot be read as safetensors: header length {n} past the file's end")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TensorFileError(f"{path} cannot be read as safetensors: {err}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path} cannot be read as safetensors: its header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"{path} cannot be read as safetensors: tensor {name!r} has a malformed header "
                                  "entry") from None
        if not 0 <= begin <= end <= data_size:
            raise TensorFileError(f"{path} cannot be read as safetensors: tensor {name!r} lies past the end of "
                                  "the file (truncated?)")
        elem = _element_size(dtype)
        if elem is not None and end - begin != math.prod(shape) * elem:
            raise TensorFileError(f"{path} cannot be read as safetensors: tensor {name!r} has {end - begin} "
                                  f"bytes, not what {dtype} {list(shape)} needs")
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + begin, end - begin)
    return entries


def _element_size(dtype: str) -> int | None:
    if dtype in DTYPES:
        return torch.empty((), dtype=DTYPES[dtype]).element_size()
    return None


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (any dtype, bf16 included)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def read_into(entries: Iterable[tuple[TensorEntry, torch.Tensor]]) -> None:
    """Fill each destination tensor (contiguous, CPU, the entry's shape) from its entry,
    converting the dtype where they differ (through one tensor-sized buffer)."""
    handles: dict[Path, object] = {}
    try:
        for entry, dest in entries:
            if entry.dtype not in DTYPES:
                raise TensorFileError(f"{entry.path}: tensor {entry.name!r} is {entry.dtype}; sol loads "
                                      f"{', '.join(DTYPES)} weights only")
            f = handles.get(entry.path)
            if f is None:
                f = handles[entry.path] = open(entry.path, "rb")  # noqa: SIM115 (closed below)
            target = dest if dest.dtype == entry.torch_dtype else torch.empty(entry.shape, dtype=entry.torch_dtype)
            f.seek(entry.offset)
            if f.readinto(_bytes_of(target)) != entry.nbytes:
                raise TensorFileError(f"{entry.path}: tensor {entry.name!r} is cut short (truncated file)")
            if target is not dest:
                dest.copy_(target)
    finally:
        for f in handles.values():
            f.close()


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (CPU, float dtypes of DTYPES) as a safetensors file, one tensor's
    bytes at a time from its own storage. The file is fsynced."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise ValueError(f"tensor {name!r} is {t.dtype}; only {', '.join(map(str, NAMES))} are written")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)     # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(_bytes_of(t.detach().to("cpu").contiguous()))
        f.flush()
        os.fsync(f.fileno())
