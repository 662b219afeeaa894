"""The Python API, shaped like sentence-transformers: `Embedder(...).encode(texts)` -> numpy.

>>> from runner import Embedder
>>> model = Embedder("all-minilm-l6-v2")
>>> model.encode(["A man is eating food.", "A man is riding a horse."]).shape
(2, 384)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runner.embed import embed_texts
from runner.engine import open_engine
from runner.model import resolve_model


def auto_plan(model: str):
    """runner/plan.py's choice for MODEL on this machine, at the model's default max length."""
    from quantize.registry import load_registry
    from runner.hardware import probe, with_overrides
    from runner.plan import default_max_length, plan
    from runner.shapes import file_quant, resolve_shape

    shape = resolve_shape(model)
    entry = load_registry().get(model)
    quant = file_quant(Path(model)) if Path(model).is_file() else None
    hw = with_overrides(probe(), reserve=2**30)
    return plan(shape, hw, default_max_length(shape, entry.max_length if entry else None), quant)


class Embedder:
    """A GGUF embedder: a .gguf file, a model directory, or a models.toml name.

    quant picks a file of a model directory or name (default: the highest fidelity on disk); "auto" plans
    for this machine like `runner embed --auto-quant` (quant, GPU layers; produced if not on disk).
    """

    def __init__(self, model: str, quant: str | None = None, threads: int | None = None) -> None:
        gpu_layers, split, reserve = 0, None, 0
        self.plan = None
        if quant is not None and quant.lower() == "auto":
            self.plan = auto_plan(model)
            gpu_layers, split = self.plan.chosen.n_gpu_layers, self.plan.tensor_split
            reserve = self.plan.settings.max_length  # claim the planned context now: fail (and retry) early
            quant = None if Path(model).is_file() else self.plan.chosen.quant
        self.resolved = resolve_model(model, quant)
        self.engine = open_engine(self.resolved.path, threads, gpu_layers, split, reserve)

    @property
    def dims(self) -> int:
        return self.engine.n_embd

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 256,
        normalize_embeddings: bool = True,
        show_progress_bar: bool = False,
        query: bool = False,
        task: str | None = None,
        max_length: int | None = None,
    ) -> np.ndarray:
        """float32 vectors, one row per text (a 1-D vector for a single string).

        batch_size texts go to the engine per call (it packs them into micro-batches itself).
        """
        from tqdm import tqdm

        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        with tqdm(total=len(texts), unit="text", disable=not show_progress_bar) as bar:
            for start in range(0, len(texts), max(1, batch_size)):
                batch = texts[start : start + batch_size]
                out[start : start + len(batch)] = embed_texts(
                    self.engine,
                    batch,
                    self.resolved.prompts,
                    query=query,
                    task=task,
                    max_length=max_length or self.resolved.max_length,
                    normalize=normalize_embeddings,
                    first_index=start,
                )
                bar.update(len(batch))
        return out[0] if single else out

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
