"""Hand-editing GGUF files for tests: every metadata entry and tensor info as raw bytes, with their offsets.

Independent of quantize/gguf_header.py on purpose (a test of a reader should not reuse it) and of gguf-py's
writer (which refuses the malformed values hostile-file tests need to write).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
U32, I32, F32, BOOL, U64 = 4, 5, 6, 7, 10
# ggml type -> (block elements, block bytes), for the few types the tests touch
BLOCKS = {0: (1, 4), 1: (1, 2), 8: (32, 34), 30: (1, 2)}


@dataclass
class Entry:
    key: str
    vtype: int
    raw: bytes  # the value as stored after its type field (for arrays: element type, count, items)

    def encode(self) -> bytes:
        return pack_string(self.key.encode()) + struct.pack("<I", self.vtype) + self.raw


@dataclass
class Tensor:
    name: str
    dims: list[int]  # ggml order: the row length first
    qtype: int
    offset: int  # relative to the data section

    def encode(self) -> bytes:
        out = pack_string(self.name.encode()) + struct.pack("<I", len(self.dims))
        return out + struct.pack(f"<{len(self.dims)}Q", *self.dims) + struct.pack("<IQ", self.qtype, self.offset)

    @property
    def nbytes(self) -> int:
        block, size = BLOCKS[self.qtype]
        return int(np.prod(self.dims)) // block * size


@dataclass
class Slot:
    """A fixed-size field of the header a fuzzer can overwrite: where it is, its struct format, what it is."""

    offset: int
    fmt: str
    kind: str  # "count" (a length or count), "type" (a value or element type), "dims", "value"
    owner: str  # the key or tensor it belongs to


@dataclass
class Gguf:
    version: int
    entries: list[Entry]
    tensors: list[Tensor]
    data: bytes  # the data section, from its aligned start to the end of the file
    header_size: int = 0  # bytes before the data section's padding, as read
    slots: list[Slot] = field(default_factory=list)

    # --- metadata ---------------------------------------------------------------------------
    def find(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)

    def value(self, key: str):
        e = self.find(key)
        if e is None:
            return None
        if e.vtype == STRING:
            return unpack_string(e.raw, 0)[0].decode()
        if e.vtype == ARRAY:
            return decode_array(e.raw)
        return struct.unpack_from("<" + SCALARS[e.vtype], e.raw)[0]

    def set(self, key: str, value, vtype: int | None = None) -> Gguf:
        """KEY = VALUE (a str, bool, int, float or list); VTYPE defaults to the entry's own or one from VALUE."""
        old = self.find(key)
        vtype = vtype if vtype is not None else (old.vtype if old else _type_of(value))
        entry = Entry(key, vtype, encode_value(vtype, value))
        entries = [entry if e.key == key else e for e in self.entries]
        return replace(self, entries=entries if old else [*entries, entry])

    def drop(self, key: str) -> Gguf:
        return replace(self, entries=[e for e in self.entries if e.key != key])

    # --- tensors ----------------------------------------------------------------------------
    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def tensor_bytes(self, name: str) -> bytes:
        t = self.tensor(name)
        return self.data[t.offset : t.offset + t.nbytes]

    def with_tensors(self, tensors: list[tuple[Tensor, bytes]]) -> Gguf:
        """New tensors and data, laid out again (offsets recomputed, 32-byte aligned)."""
        out, data = [], b""
        for t, blob in tensors:
            out.append(replace(t, offset=len(data)))
            data += blob + b"\0" * (-len(blob) % 32)
        return replace(self, tensors=out, data=data)

    def patch(self, name: str, blob: bytes) -> Gguf:
        """Tensor NAME's data replaced by BLOB, of the same size."""
        t = self.tensor(name)
        assert len(blob) == t.nbytes
        return replace(self, data=self.data[: t.offset] + blob + self.data[t.offset + t.nbytes :])

    # --- bytes ------------------------------------------------------------------------------
    def header(self) -> bytes:
        head = b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.entries))
        return head + b"".join(e.encode() for e in self.entries) + b"".join(t.encode() for t in self.tensors)

    def to_bytes(self) -> bytes:
        head = self.header()
        return head + b"\0" * (-len(head) % 32) + self.data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path


def pack_string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def unpack_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8 : pos + 8 + n], pos + 8 + n


def _type_of(value) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return U32
    if isinstance(value, float):
        return F32
    if isinstance(value, list):
        return ARRAY
    return STRING


def encode_value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return pack_string(value if isinstance(value, bytes) else str(value).encode())
    if vtype == ARRAY:
        first = value[0] if value else 0
        etype = STRING if isinstance(first, (str, bytes)) else F32 if isinstance(first, float) else I32
        return struct.pack("<IQ", etype, len(value)) + b"".join(encode_value(etype, v) for v in value)
    return struct.pack("<" + SCALARS[vtype], value)


def decode_array(raw: bytes) -> list:
    etype, count = struct.unpack_from("<IQ", raw)
    pos, out = 12, []
    if etype == STRING:
        for _ in range(count):
            s, pos = unpack_string(raw, pos)
            out.append(s)
        return out
    fmt = SCALARS[etype]
    return list(struct.unpack_from(f"<{count}{fmt}", raw, pos))


def read(path: Path) -> Gguf:
    """PATH parsed into entries and tensors (raw), remembering where each fixed-size field sits."""
    buf = Path(path).read_bytes()
    slots: list[Slot] = []
    pos = 0

    def take(fmt: str, kind: str | None = None, owner: str = ""):
        nonlocal pos
        if kind:
            slots.append(Slot(pos, fmt, kind, owner))
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return out[0] if len(out) == 1 else out

    assert buf[:4] == b"GGUF"
    pos = 4
    version = take("I")
    n_tensors = take("Q", "count", "n_tensors")
    n_kv = take("Q", "count", "n_kv")
    entries = []
    for _ in range(n_kv):
        n = take("Q", "count", "key")
        key = buf[pos : pos + n].decode()
        slots[-1].owner = key
        pos += n
        vtype = take("I", "type", key)
        start = pos
        if vtype == ARRAY:
            etype = take("I", "type", key)
            count = take("Q", "count", key)
            if etype == STRING:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            else:
                pos += struct.calcsize("<" + SCALARS[etype]) * count
        elif vtype == STRING:
            pos += 8 + take("Q", "count", key)
        else:
            take(SCALARS[vtype], "value", key)
        entries.append(Entry(key, vtype, buf[start:pos]))
    tensors = []
    for _ in range(n_tensors):
        name, pos = unpack_string(buf, pos)
        n_dims = take("I", "dims", name.decode())
        dims = [take("Q", "dims", name.decode()) for _ in range(n_dims)]
        qtype = take("I", "type", name.decode())
        offset = take("Q", "count", name.decode())
        tensors.append(Tensor(name.decode(), dims, qtype, offset))
    start = pos + (-pos % 32)
    return Gguf(version, entries, tensors, buf[start:], pos, slots)


def shrink_vocab(path: Path, dest: Path, n: int) -> Path:
    """PATH with its vocabulary cut to the first N tokens (token_embd rows too): a small, loadable model."""
    g = read(path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        e = g.find(key)
        if e is not None:
            etype = struct.unpack_from("<I", e.raw)[0]
            values = decode_array(e.raw)[:n]
            items = b"".join(encode_value(etype, v) for v in values)
            kept = Entry(key, ARRAY, struct.pack("<IQ", etype, n) + items)
            g = replace(g, entries=[kept if x.key == key else x for x in g.entries])
    arch = g.value("general.architecture")
    if g.find(f"{arch}.vocab_size"):
        g = g.set(f"{arch}.vocab_size", n)
    tensors = []
    for t in g.tensors:
        blob = g.tensor_bytes(t.name)
        if t.name == "token_embd.weight":
            row = t.nbytes // t.dims[1]
            t, blob = replace(t, dims=[t.dims[0], n]), blob[: row * n]
        tensors.append((t, blob))
    return g.with_tensors(tensors).write(dest)
