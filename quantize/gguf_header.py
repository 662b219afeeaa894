"""A lean reader of a GGUF file's header: scalar metadata, array lengths, tensor infos, data offset.

gguf.GGUFReader builds numpy views for every element of every array, which for a Llama-3 vocabulary
(128k tokens, 280k merges) peaks at over 1 GB of RAM — more than a small model needs to run. This walks
the same format (GGUF v2/v3: little-endian, length-prefixed strings) and keeps only what the runner and
planner read: scalars and strings, each array's length, and each tensor's name, shape and type.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Header:
    metadata: dict[str, object]  # scalars and strings
    array_lengths: dict[str, int]
    tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]  # shape in numpy order (rows first)
    data_offset: int


class _Cursor:
    """Reads the file in 4 MiB chunks; `offset` is the file position of buf[0]."""

    def __init__(self, f) -> None:
        self.f = f
        self.buf = b""
        self.pos = 0
        self.offset = 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            self.offset += self.pos
            self.buf = self.buf[self.pos :] + self.f.read(max(n, 1 << 22))
            self.pos = 0
            if n > len(self.buf):
                raise ValueError("file ends inside its header")

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        self.need(size)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.unpack("Q")
        self.need(n)
        s = self.buf[self.pos : self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.unpack("Q")
        self.need(n)
        self.pos += n

    def tell(self) -> int:
        return self.offset + self.pos


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        c = _Cursor(f)
        magic, version = c.unpack("4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_kv = c.unpack("QQ")
        metadata: dict[str, object] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = c.string()
            vtype = c.unpack("I")
            if vtype == _ARRAY:
                etype, count = c.unpack("IQ")
                lengths[key] = count
                if etype == _STRING:
                    for _ in range(count):
                        c.skip_string()
                elif etype in _SCALARS:
                    size = struct.calcsize(_SCALARS[etype]) * count
                    c.need(size)
                    c.pos += size
                else:
                    raise ValueError(f"nested array in {key}")
            elif vtype == _STRING:
                metadata[key] = c.string()
            elif vtype in _SCALARS:
                metadata[key] = c.unpack(_SCALARS[vtype])
            else:
                raise ValueError(f"unknown value type {vtype} for {key}")
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("I")
            dims = [c.unpack("Q") for _ in range(n_dims)]
            qtype, _offset = c.unpack("IQ")
            tensors.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(qtype)))
        alignment = int(metadata.get("general.alignment", 32))
        data_offset = -(-c.tell() // alignment) * alignment
    return Header(metadata, lengths, tensors, data_offset)
