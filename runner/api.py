"""The Python API, shaped like sentence-transformers: `Embedder(...).encode(texts)` -> numpy.

>>> from runner import Embedder
>>> model = Embedder("all-minilm-l6-v2")
>>> model.encode(["A man is eating food.", "A man is riding a horse."]).shape
(2, 384)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runner.embed import embed_texts
from runner.engine import Engine
from runner.model import resolve_model


class Embedder:
    """A GGUF embedder: a .gguf file, a model directory, or a models.toml name.

    quant picks a file of a model directory or name (default: the highest fidelity on disk).
    """

    def __init__(self, model: str, quant: str | None = None, threads: int | None = None) -> None:
        self.resolved = resolve_model(model, quant)
        self.engine = Engine(self.resolved.path, n_threads=threads)

    @property
    def dims(self) -> int:
        return self.engine.n_embd

    def encode(
        self,
        sentences: str | Sequence[str],
        normalize_embeddings: bool = True,
        query: bool = False,
        task: str | None = None,
        max_length: int | None = None,
    ) -> np.ndarray:
        """float32 vectors, one row per text (a 1-D vector for a single string)."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        vectors = embed_texts(
            self.engine,
            texts,
            self.resolved.prompts,
            query=query,
            task=task,
            max_length=max_length or self.resolved.max_length,
            normalize=normalize_embeddings,
        )
        return vectors[0] if single else vectors

    def encode_query(self, sentences: str | Sequence[str], task: str | None = None, **kwargs) -> np.ndarray:
        """Queries get the model's instruction template (`Instruct: {task}\\nQuery: {text}` for nemotron)."""
        return self.encode(sentences, query=True, task=task, **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs) -> np.ndarray:
        return self.encode(sentences, query=False, **kwargs)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
