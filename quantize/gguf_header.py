"""A lean reader of a GGUF file's header: scalar metadata, array lengths, tensor infos, data offset.

gguf.GGUFReader builds numpy views for every element of every array, which for a Llama-3 vocabulary
(128k tokens, 280k merges) peaks at over 1 GB of RAM — more than a small model needs to run. This walks
the same format (GGUF v2/v3: little-endian, length-prefixed strings) and keeps only what the runner and
planner read: scalars and strings, each array's length, and each tensor's name, shape and type; and where
each metadata entry lies in the file, so tests/synth.py copies a file with a few entries changed. It is the
one raw GGUF reader of the project.

The file may come from anyone, so every count and length is checked against the bytes the file has
before anything is read or allocated: a corrupt header is a ValueError saying what is wrong, never a
MemoryError, a hang or a wrong value (quantize/gguf_check.py then checks what the values mean).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
TENSOR_ALIGNMENT = 32  # ggml-backend's TENSOR_ALIGNMENT
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPES = "tokenizer.ggml.token_type"


@dataclass(frozen=True)
class Header:
    metadata: dict[str, object]  # scalars and strings
    array_lengths: dict[str, int]
    tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]  # shape in numpy order (rows first)
    data_offset: int
    array_types: dict[str, int] = field(default_factory=dict)  # element type of each array (8: string)
    # Each tensor's data offset relative to data_offset, in the order of `tensors`.
    tensor_offsets: list[int] = field(default_factory=list)
    file_size: int = 0
    # The vocabulary's token strings, counted without keeping them (llama.cpp aborts on a repeated token
    # and on SPM text it cannot spell without the 256 <0xXX> byte tokens).
    distinct_tokens: int = 0
    byte_tokens: int = 0
    token_types: dict[int, int] = field(default_factory=dict)  # how many tokens of each tokenizer.ggml.token_type
    # Each metadata entry's bytes in the file (key, type and value), as [start, end): enough to copy a file
    # with a few entries changed without decoding the vocabulary.
    entry_spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    header_end: int = 0  # where the tensor index ends, before the padding up to data_offset


class _Cursor:
    """Reads the file in 4 MiB chunks; `offset` is the file position of buf[0]."""

    def __init__(self, f, size: int) -> None:
        self.f = f
        self.size = size
        self.buf = b""
        self.pos = 0
        self.offset = 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            if self.tell() + n > self.size:  # checked first: a corrupt length must not become a huge read
                raise ValueError(f"file ends inside its header (at byte {self.tell()} it needs {n} more bytes)")
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

    def raw(self) -> bytes:
        n = self.unpack("Q")
        self.need(n)
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.unpack("Q")
        self.need(n)
        self.pos += n

    def string(self, what: str) -> str:
        try:
            return self.raw().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not UTF-8") from None

    def count(self, n: int, each: int, what: str) -> int:
        """N items of at least EACH bytes must fit in what is left of the file."""
        left = self.size - self.tell()
        if n * each > left:
            raise ValueError(f"header claims {n} {what}, more than the {left} bytes left in the file can hold")
        return n

    def tell(self) -> int:
        return self.offset + self.pos


_BYTE_TOKENS = frozenset(f"<0x{b:02X}>".encode() for b in range(256))


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        c = _Cursor(f, os.fstat(f.fileno()).st_size)
        magic, version = c.unpack("4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_kv = c.unpack("QQ")
        c.count(n_kv, 8 + 4 + 1, "metadata keys")  # key length, value type, at least one byte of value
        metadata: dict[str, object] = {}
        lengths: dict[str, int] = {}
        types: dict[str, int] = {}
        distinct = byte_tokens = 0
        token_types: dict[int, int] = {}
        spans: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            start = c.tell()
            key = c.string("a metadata key")
            if key in metadata or key in lengths:
                raise ValueError(f"metadata key {key!r:.80} appears twice")
            vtype = c.unpack("I")
            if vtype == _ARRAY:
                etype, count = c.unpack("IQ")
                lengths[key], types[key] = count, etype
                if etype == _STRING:
                    c.count(count, 8, f"strings in {key!r:.80}")
                    if key == TOKENS:
                        seen = {c.raw() for _ in range(count)}
                        distinct, byte_tokens = len(seen), len(seen & _BYTE_TOKENS)
                    else:
                        for _ in range(count):
                            c.skip_string()
                elif etype in _SCALARS:
                    each = struct.calcsize(_SCALARS[etype])
                    size = each * c.count(count, each, f"values in {key!r:.80}")
                    c.need(size)
                    if key == TOKEN_TYPES and etype == 5:
                        values, counts = np.unique(np.frombuffer(c.buf, "<i4", count, c.pos), return_counts=True)
                        token_types = dict(zip(values.tolist(), counts.tolist(), strict=True))
                    c.pos += size
                else:
                    raise ValueError(f"array of unknown or nested type {etype} in {key!r:.80}")
            elif vtype == _STRING:
                metadata[key] = c.string(f"the value of {key!r:.80}")
            elif vtype in _SCALARS:
                metadata[key] = c.unpack(_SCALARS[vtype])
            else:
                raise ValueError(f"unknown value type {vtype} for {key!r:.80}")
            spans[key] = (start, c.tell())
        c.count(n_tensors, 8 + 4 + 4 + 8, "tensors")  # name length, n_dims, type, offset
        tensors, offsets = [], []
        for _ in range(n_tensors):
            name = c.string("a tensor name")
            n_dims = c.unpack("I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name!r:.80} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [c.unpack("Q") for _ in range(n_dims)]
            qtype, offset = c.unpack("IQ")
            try:
                kind = gguf.GGMLQuantizationType(qtype)
            except ValueError:
                raise ValueError(f"tensor {name!r:.80} has unknown type {qtype}") from None
            tensors.append((name, tuple(reversed(dims)), kind))
            offsets.append(offset)
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= 1 << 30:
            raise ValueError(f"general.alignment {alignment!r} is not a positive integer")
        if alignment & (alignment - 1) or alignment < TENSOR_ALIGNMENT:
            # ggml asserts tensor data is 32-byte aligned in memory: a smaller alignment aborts the load
            raise ValueError(f"general.alignment {alignment} is not a power of two of at least {TENSOR_ALIGNMENT}")
        data_offset = -(-c.tell() // alignment) * alignment
    return Header(
        metadata,
        lengths,
        tensors,
        data_offset,
        types,
        offsets,
        c.size,
        distinct,
        byte_tokens,
        token_types,
        spans,
        c.tell(),
    )
