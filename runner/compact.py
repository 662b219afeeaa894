"""Smaller vectors: Matryoshka truncation to the dimensions a model was trained for.

Matryoshka-trained models (Qwen3-Embedding: 32 to 4096) keep most of their quality in a vector's first N
dimensions; any other model's first N dimensions are just a worse vector, so asking for fewer dimensions
is refused unless the model declares it (models.toml `matryoshka_dims`, carried in the GGUF as
`embedrunner.matryoshka.dims`). Truncation comes before the L2 normalisation, so a cut vector is unit length
again, as sentence-transformers' `truncate_dim` and OpenAI's `dimensions` give it.
"""

from __future__ import annotations

import numpy as np

from quantize import gguf_keys
from quantize.errors import BadInput, CorruptModelFile


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
