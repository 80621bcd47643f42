"""A GGUF file's header, metadata and tensor table, read without gguf-py.

gguf-py refuses tensor types it does not know, and BitNet.cpp's I2_S (type 36) and
llama.cpp's Q2_0 (type 42) are among them, so the read-back of such an export parses the
container itself: GGUF v3, little endian, data aligned to `general.alignment` (32 when
absent).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: id -> struct format of a scalar (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # PyTorch order (GGUF stores the innermost dimension first)
    type_id: int  # GGML type id as written in the file
    offset: int  # absolute byte offset of the data in the file


@dataclass
class GgufLayout:
    version: int
    metadata: dict[str, object]
    tensors: list[TensorEntry] = field(default_factory=list)
    file_size: int = 0

    def tensor(self, name: str) -> TensorEntry | None:
        return next((t for t in self.tensors if t.name == name), None)

    def data_end(self, entry: TensorEntry) -> int:
        """Where the next tensor's data (or the file) begins after `entry`."""
        later = [t.offset for t in self.tensors if t.offset > entry.offset]
        return min(later) if later else self.file_size


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise ValueError("truncated GGUF header")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("Q")
        raw = self.data[self.pos:self.pos + length]
        if len(raw) != length:
            raise ValueError("truncated GGUF string")
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int):
        if type_id in _SCALARS:
            return self.take(_SCALARS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.take("I"), self.take("Q")
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF metadata type {type_id}")


def read_gguf_layout(path: str | Path) -> GgufLayout:
    """Parse the header, every metadata value and the tensor table of a GGUF v2/v3 file."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse(data, path)


def _parse(data, path) -> GgufLayout:
    cursor = _Cursor(data)
    if data[:4] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {data[:4]!r})")
    cursor.pos = 4
    version = cursor.take("I")
    n_tensors, n_kv = cursor.take("Q"), cursor.take("Q")
    metadata = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.take("Q") for _ in range(cursor.take("I"))]
        infos.append((name, tuple(reversed(dims)), cursor.take("I"), cursor.take("Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = [TensorEntry(name, shape, type_id, data_start + offset)
               for name, shape, type_id, offset in infos]
    return GgufLayout(version, metadata, tensors, len(data))
