"""Smaller vectors: Matryoshka truncation to the dimensions a model was trained for, and compact precisions.

Matryoshka-trained models (Qwen3-Embedding: 32 to 4096) keep most of their quality in a vector's first N
dimensions; any other model's first N dimensions are just a worse vector, so asking for fewer dimensions
is refused unless the model declares it (models.toml `matryoshka_dims`, carried in the GGUF as
`embedrunner.matryoshka.dims`). Truncation comes before the L2 normalisation, so a cut vector is unit length
again, as sentence-transformers' `truncate_dim` and OpenAI's `dimensions` give it.

Precisions are sentence-transformers' `quantize_embeddings`, value for value, so vectors stored by one can be
searched with queries quantized by the other: int8/uint8 split each dimension's range [min, max] into 256
buckets (floor, clipped), with the ranges from calibration vectors or from the data itself, as a (2, dims)
float32 array (row 0 the minima, row 1 the maxima: its `ranges` argument); binary/ubinary keep the sign bit,
8 dimensions a byte (binary as int8: the packed byte - 128).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from quantize import gguf_keys
from quantize.errors import BadInput, CorruptModelFile

log = logging.getLogger("runner")
PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int8": np.int8,
    "uint8": np.uint8,
    "binary": np.int8,
    "ubinary": np.uint8,
}
RANGED = ("int8", "uint8")  # precisions that need per-dimension ranges


def format_dims(dims: list[int] | tuple[int, ...]) -> str:
    """How the GGUF carries the dimensions: "32,64,...,4096" (llama.cpp's metadata API reads no arrays)."""
    return ",".join(str(d) for d in dims)


def parse_dims(value: str | None, width: int, where: object) -> tuple[int, ...]:
    """The Matryoshka dimensions a GGUF declares (empty: none), checked against the model's WIDTH."""
    if not value:
        return ()
    try:
        dims = tuple(int(d) for d in value.split(","))
    except ValueError:
        raise CorruptModelFile(f"{where}: {gguf_keys.MATRYOSHKA_DIMS} {value[:80]!r} is not a number list") from None
    if list(dims) != sorted(set(dims)) or dims[0] < 1 or dims[-1] != width:
        raise CorruptModelFile(
            f"{where}: {gguf_keys.MATRYOSHKA_DIMS} {value[:80]!r} must rise to the model's width {width}"
        )
    return dims


def check_dimensions(dimensions: int | None, width: int, trained: tuple[int, ...], model: str) -> int | None:
    """DIMENSIONS as asked (None: the full WIDTH), or a BadInput saying why MODEL cannot give it.

    Any value from the smallest TRAINED dimension up to the width is allowed (Qwen3-Embedding's card:
    any output size from 32 to 4096); the full width always is.
    """
    if dimensions is None or dimensions == width:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise BadInput(f"--dimensions {dimensions!r}: must be a whole number of at least 1")
    if not trained:
        raise BadInput(
            f"--dimensions {dimensions}: {model} was not trained for Matryoshka truncation, so its first "
            f"{dimensions} dimensions would be a silently worse vector; leave out --dimensions ({width} dimensions)"
        )
    if not trained[0] <= dimensions <= width:
        raise BadInput(
            f"--dimensions {dimensions}: {model} gives {trained[0]} to {width} dimensions "
            f"(trained at {format_dims(trained)})"
        )
    return dimensions


def truncate(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first DIMENSIONS columns of VECTORS (all of them for None), contiguous, not yet normalised."""
    return vectors if dimensions is None else np.ascontiguousarray(vectors[:, :dimensions])


# --- precisions ----------------------------------------------------------------------------------
def width(precision: str, dims: int) -> int:
    """Columns of a DIMS-wide vector in PRECISION: the bytes of the packed bits for binary/ubinary."""
    return -(-dims // 8) if precision.endswith("binary") else dims


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise BadInput(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def ranges_of(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension (min, max) of VECTORS as a (2, dims) float32 array: quantize_embeddings' `ranges`."""
    _enough(len(vectors))
    return np.vstack((vectors.min(axis=0), vectors.max(axis=0))).astype(np.float32)


def _enough(count: int) -> None:
    """Ranges from COUNT vectors: refused from fewer than 2, warned about below 100 (as sentence-transformers)."""
    if count < 2:
        raise BadInput(
            f"int8/uint8 ranges from {count} vector(s) say nothing; pass ranges saved by an earlier run "
            "(--ranges) or calibration texts (--calibration)"
        )
    if count < 100:
        log.warning("int8/uint8 ranges from only %d vectors; calibration texts give steadier ones", count)


class Ranges:
    """Running per-dimension minima and maxima over vectors seen a chunk at a time (flat memory)."""

    def __init__(self) -> None:
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.count = 0

    def update(self, vectors: np.ndarray) -> None:
        if not len(vectors):
            return
        low, high = vectors.min(axis=0), vectors.max(axis=0)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)
        self.count += len(vectors)

    def result(self) -> np.ndarray:
        _enough(self.count)
        assert self.low is not None and self.high is not None
        return np.vstack((self.low, self.high)).astype(np.float32)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """VECTORS (float32, n x dims) in PRECISION; int8/uint8 with RANGES (default: from VECTORS themselves)."""
    if precision in ("float32", "float16"):
        return np.ascontiguousarray(vectors, dtype=DTYPES[precision])
    if precision in RANGED:
        where = f"precision {precision}"
        ranges = ranges_of(vectors) if ranges is None else check_ranges(ranges, vectors.shape[-1], where)
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)  # a constant dimension: every value in bucket 0
        buckets = np.clip(np.floor((vectors.astype(np.float32, copy=False) - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    if precision in ("binary", "ubinary"):
        bits = np.packbits(vectors > 0, axis=-1)
        return bits if precision == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    raise BadInput(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def ranges_path(output: Path) -> Path:
    """Where a run's int8/uint8 ranges are saved: beside its output, `<output>.ranges.npy`."""
    return output.with_name(output.name + ".ranges.npy")


def check_ranges(ranges: object, dims: int, where: object) -> np.ndarray:
    """RANGES as a (2, DIMS) float32 array of minima over maxima, or a BadInput naming WHERE they came from.

    Every value finite and within float32's range (1e300 would become inf, and every code 0), no minimum above
    its maximum, the shape exact (a (2, 1) array would broadcast over every dimension without a word).
    """
    array = np.asarray(ranges)
    if array.shape != (2, dims) or not np.issubdtype(array.dtype, np.floating):
        raise BadInput(
            f"{where}: ranges must be a (2, {dims}) float array (row 0 the minima, row 1 the maxima), "
            f"not {array.dtype} {array.shape}; `runner.compact.ranges_of(vectors)` makes one"
        )
    if not (np.isfinite(array) & (np.abs(array) <= np.finfo(np.float32).max)).all():
        raise BadInput(f"{where}: ranges must be finite float32 values; some are NaN, infinite or beyond 3.4e38")
    if (array[0] > array[1]).any():
        raise BadInput(f"{where}: some minima (row 0) exceed their maxima (row 1)")
    return array.astype(np.float32)
