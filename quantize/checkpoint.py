"""Lazy access to a checkpoint's safetensors shards: names and shapes up front, data one tensor at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.utility import SafetensorsLocal

from quantize.errors import CorruptModelFile

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class LazyTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    def load(self) -> np.ndarray:
        """The tensor as float32 (a fresh array; the file is only memory-mapped while reading)."""
        if self.dtype not in _FLOATS:
            raise CorruptModelFile(f"{self.file}: tensor {self.name} is {self.dtype}; weights must be F32/F16/BF16")
        raw = np.memmap(self.file, mode="r", offset=self.offset, shape=(self.nbytes,), dtype=np.uint8)
        if self.dtype == "F32":
            out = np.array(raw.view(np.float32))
        elif self.dtype == "F16":
            out = raw.view(np.float16).astype(np.float32)
        else:  # BF16: the high half of a float32; shifted in place to hold one copy, not two
            bits = raw.view(np.uint16).astype(np.uint32)
            bits <<= 16
            out = bits.view(np.float32)
        del raw
        return out.reshape(self.shape)


def open_checkpoint(path: Path) -> dict[str, LazyTensor]:
    """Index every tensor of every *.safetensors shard in PATH without reading tensor data."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(pickles)}: pickles are not loaded; save with safetensors)" if pickles else ""
        raise CorruptModelFile(f"{path}: no *.safetensors weights{hint}")
    tensors: dict[str, LazyTensor] = {}
    for file in files:
        try:
            with SafetensorsLocal(file) as entries:
                items = list(entries.items())
        except (ValueError, UnicodeDecodeError, KeyError, OSError) as e:
            raise CorruptModelFile(f"{file}: not a readable safetensors file ({e}); re-download it") from None
        size = file.stat().st_size
        for name, t in items:
            if t.dtype not in _ITEMSIZE:
                raise CorruptModelFile(f"{file}: tensor {name} has unknown dtype {t.dtype}")
            r = t.data_range
            if r.size != math.prod(t.shape) * _ITEMSIZE[t.dtype] or r.offset + r.size > size:
                raise CorruptModelFile(f"{file}: tensor {name} lies outside the file (truncated?); re-download it")
            if name in tensors:
                raise CorruptModelFile(f"{file}: tensor {name} also appears in {tensors[name].file.name}")
            tensors[name] = LazyTensor(name, t.dtype, tuple(t.shape), file, r.offset, r.size)
    return tensors
