"""Runner: load a GGUF embedder into llama.cpp and turn texts into vectors.

`Embedder` is imported on first use, so `import runner.<module>` of a pure module (or of the planner
through it) does not load llama.cpp's native library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import quantize  # noqa: F401  (sets how llama.cpp's threads wait before runner.engine loads it: quantize/openmp.py)

if TYPE_CHECKING:
    from runner.api import Embedder


def __getattr__(name: str):
    if name == "Embedder":
        from runner.api import Embedder

        return Embedder
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


__all__ = ["Embedder"]
