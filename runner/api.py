"""The Python API, shaped like sentence-transformers: `Embedder(...).encode(texts)` -> numpy.

>>> from runner import Embedder
>>> model = Embedder("all-minilm-l6-v2")
>>> model.encode(["A man is eating food.", "A man is riding a horse."]).shape
(2, 384)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from planner import HardwareOptions, Plan
from quantize.errors import BadInput
from runner import compact
from runner.pipeline import Pipeline, open_pipeline


class Embedder:
    """A GGUF embedder, MODEL as `runner embed -m` takes it (quantize.reference.ModelRef): a .gguf file, a model
    directory, an HF checkpoint directory, a models.toml name or a hub repo id. A model not on disk yet is
    downloaded, converted and quantized first, after the disk check, saying each step on stderr.

    quant picks a file of a model directory or name and pins it for the model's later runs (default: the pinned
    quant, else the highest fidelity on disk); "auto" plans for this machine like `runner embed --auto-quant`
    (quant, GPU layers; produced if not on disk; a pinned model keeps its quant), with HARDWARE saying what to
    plan for (default: what the probe finds, 1 GiB kept back on every device) and PREFER what a CPU plan favours
    (fidelity | balanced | speed; see planner/policy.py).
    max_length: where inputs are cut (default: the model's, as `runner embed`).
    packed: several texts per llama.cpp micro-batch, faster for short texts but batch-dependent (default: one
    text per micro-batch on the CPU, so a text gets the same vector in any batch; see runner/engine.py).
    """

    def __init__(
        self,
        model: str,
        quant: str | None = None,
        threads: int | None = None,
        max_length: int | None = None,
        hardware: HardwareOptions | None = None,
        prefer: str | None = None,
        packed: bool | None = None,
    ) -> None:
        auto = quant is not None and quant.lower() == "auto"
        hardware = hardware or HardwareOptions()
        if prefer is not None:
            hardware = replace(hardware, prefer=prefer)
        self.pipeline: Pipeline = open_pipeline(
            model,
            None if auto else quant,
            auto_quant=auto,
            max_length=max_length,
            threads=threads,
            hardware=hardware,
            packed=packed,
        )

    @property
    def plan(self) -> Plan | None:
        return self.pipeline.plan

    @property
    def dims(self) -> int:
        return self.pipeline.dims

    @property
    def max_length(self) -> int:
        return self.pipeline.max_length

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 256,
        normalize_embeddings: bool = True,
        show_progress_bar: bool = False,
        query: bool = False,
        task: str | None = None,
        dimensions: int | None = None,
        precision: str = "float32",
        ranges: np.ndarray | None = None,
    ) -> np.ndarray:
        """Vectors, one row per text (a 1-D vector for a single string), float32 unless PRECISION says otherwise.

        batch_size texts go to the engine per call (it packs them into micro-batches itself). dimensions: keep
        the first N of a Matryoshka model's dimensions (re-normalised with normalize_embeddings); a model not
        trained for it refuses. precision: float32, float16, int8, uint8, binary or ubinary, as
        sentence-transformers' quantize_embeddings gives them; int8/uint8 with RANGES (a (2, dims) array of
        per-dimension minima and maxima: `runner.compact.ranges_of(calibration_vectors)`, or a run's saved
        `<output>.ranges.npy`), else with the ranges of these vectors themselves.
        """
        from tqdm import tqdm

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BadInput(f"batch_size {batch_size!r}: must be a whole number of at least 1")
        single = isinstance(sentences, str)
        if compact.check_precision(precision) in compact.RANGED and ranges is None and single:
            raise BadInput(f"precision {precision} for one text needs ranges (runner.compact.ranges_of(vectors))")
        texts = [sentences] if single else list(sentences)
        dims = self.pipeline.check_dimensions(dimensions) or self.dims
        out = np.empty((len(texts), dims), dtype=np.float32)
        with tqdm(total=len(texts), unit="text", disable=not show_progress_bar) as bar:
            chunks = self.pipeline.stream(
                texts, batch_size, query=query, task=task, normalize=normalize_embeddings, dimensions=dimensions
            )
            for chunk in chunks:
                out[chunk.first : chunk.first + chunk.count] = chunk.vectors
                bar.update(chunk.count)
        out = compact.quantize(out, precision, ranges)
        return out[0] if single else out

    def encode_query(self, sentences: str | Sequence[str], task: str | None = None, **kwargs) -> np.ndarray:
        """Queries get the model's instruction template (`Instruct: {task}\\nQuery: {text}` for nemotron)."""
        return self.encode(sentences, query=True, task=task, **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs) -> np.ndarray:
        return self.encode(sentences, query=False, **kwargs)

    def close(self) -> None:
        self.pipeline.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
