"""`runner embed`'s work as one function of a loaded pipeline: texts in, vectors streamed to an output (a file, or
JSON lines on stdout) a chunk at a time, resumable, and the run's counts out. An output file names the model file
and the options that made it (`output_metadata`). The command parses its options, opens the pipeline, calls
`run_embed` and prints what the returned stats say.

>>> from runner.pipeline import open_pipeline
>>> with open_pipeline("all-minilm-l6-v2") as pipeline:
...     stats = run_embed(pipeline, ["A man is eating food."], "vectors.npy")
>>> stats.counts.texts
1
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from runner import compact
from runner.io import VectorSink, load_ranges, output_format, run_key

if TYPE_CHECKING:  # runner.pipeline loads llama.cpp: the CLI reads EmbedOptions' defaults without it
    from runner.pipeline import Pipeline, Stats


@dataclass(frozen=True)
class EmbedOptions:
    """How texts become vectors, and how many a part on disk holds: each default is written here only (the
    `runner embed` options read theirs from this class)."""

    query: bool = False  # apply the model's query instruction (else the document template)
    task: str | None = None  # the instruction for a query (default: the model's)
    normalize: bool = True  # L2-normalise each vector
    dimensions: int | None = None  # Matryoshka models: keep the first N dimensions
    truncate: bool = True  # cut inputs over the max length (else refuse them)
    precision: str = "float32"  # float32, float16, int8, uint8, binary or ubinary (runner.compact)
    # A part on disk (what an interrupted run keeps for --resume) ends at chunk_size texts or after part_seconds of
    # embedding, whichever comes first: a slow model on a CPU keeps its work too.
    chunk_size: int = 2048
    part_seconds: float = 30.0


@dataclass(frozen=True)
class EmbedStats:
    """What a run did: its counts, its time, and where the int8/uint8 ranges it found in the data went."""

    counts: Stats  # texts embedded now, tokens, truncated, skipped (already on disk from an interrupted run)
    seconds: float
    ranges_saved: Path | None = None


def output_metadata(pipeline: Pipeline, options: EmbedOptions, dims: int) -> dict[str, object]:
    """What made a run's vectors, saved with its output file (runner.io.VectorSink.finish): the model file (name,
    quant, file name, sha256 as manifest.json records it) and how the vectors were made."""
    model = pipeline.model
    return model.identity() | {
        "pooling": model.pooling,
        "dimensions": dims,
        "precision": options.precision,
        "normalize": options.normalize,
        "max_length": pipeline.max_length,
        "query": options.query,
        "task": (options.task or model.prompts.default_task) if options.query else None,
    }


def run_embed(
    pipeline: Pipeline,
    texts: Iterable[str],
    output: str | None = None,
    fmt: str | None = None,
    options: EmbedOptions = EmbedOptions(),
    *,
    resume: bool = False,
    ranges_file: str | None = None,
    calibration: Iterable[str] | None = None,
    total: int | None = None,
    show_progress: bool = False,
    skipped_rows: list[int] | None = None,
) -> EmbedStats:
    """Embed TEXTS (read lazily: memory stays flat for any input) into OUTPUT in format FMT (default: from
    OUTPUT's suffix; stdout when OUTPUT is None).

    Vectors go to `<output>.parts/` a chunk at a time; RESUME continues an interrupted run of the same model,
    options and texts. int8/uint8 ranges come from RANGES_FILE, from the vectors of the CALIBRATION texts
    (embedded as the input is), or from the data itself (then saved beside the output). SHOW_PROGRESS draws a
    bar on stderr over TOTAL texts (None: unknown). A Ctrl-C leaves the finished parts and says how many
    texts they hold. SKIPPED_ROWS: the input's rows its reader leaves out (`--skip-empty`), filled as TEXTS are
    read; saved with the output, so its vectors can be put back in line with the input's rows.
    """
    from runner.pipeline import Stats

    fmt = output_format(output, fmt)
    dims = pipeline.check_dimensions(options.dimensions) or pipeline.dims  # refused before any input is read
    embed = dict(query=options.query, task=options.task, normalize=options.normalize, dimensions=options.dimensions)
    ranges = None
    if ranges_file:
        ranges = load_ranges(ranges_file, dims)
    elif calibration is not None:  # embedded like the input (prompt, normalisation, dimensions): its ranges fit
        ranges = compact.ranges_of(pipeline.embed(list(calibration), **embed))
    # Only a file output can be resumed, so only then is the model's content identity needed.
    key, identity = "", {}
    if output:
        identity = dict(query=options.query, task=options.task, normalize=options.normalize,
                        max_length=pipeline.max_length, fmt=fmt, dtype=options.precision)  # fmt: skip
        identity |= {"dimensions": dims} if dims != pipeline.dims else {}
        identity |= {"skip_empty": True} if skipped_rows is not None else {}
        # Not the part sizes: a resumed run takes them from the parts on disk.
        key = run_key(pipeline.model.path, identity)
    sink = VectorSink(output, fmt, options.precision, key, resume, ranges, dims=dims, options=identity)
    stats, started = Stats(), time.perf_counter()
    with tqdm(total=total, unit="text", file=sys.stderr, delay=1.0, disable=not show_progress) as bar:

        def step(count: int) -> None:  # after each micro-batch's worth of texts
            bar.set_postfix_str(f"{stats.tokens / (time.perf_counter() - started):.0f} tokens/s", refresh=False)
            bar.update(count)

        chunks = pipeline.stream(
            texts, options.chunk_size, run_key=key, part_seconds=options.part_seconds, resumed=sink.part_rows,
            skip=sink.done, stats=stats, on_step=step, truncate=options.truncate, **embed,
        )  # fmt: skip
        try:
            for chunk in chunks:
                if chunk.vectors is not None:
                    sink.write(chunk.index, chunk.digest, chunk.vectors, chunk.first)
        except KeyboardInterrupt:
            sink.abandon()
            raise KeyboardInterrupt(sink.interrupted()) from None
        except BaseException:
            sink.abandon()
            raise
    metadata = None
    if output:
        metadata = output_metadata(pipeline, options, dims)
        metadata |= {"skipped_rows": skipped_rows} if skipped_rows is not None else {}
    saved = sink.finish(metadata)
    return EmbedStats(stats, time.perf_counter() - started, saved)
