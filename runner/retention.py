"""Retention measured on the model itself: how close a quant's vectors stay to its F16 file's, on a probe set.

`runner retention -m MODEL [--quant Q]` embeds the probe set (runner/data/probe.jsonl, or `--texts FILE`) with the
model's unquantized file and with each quant, and records in the model directory's manifest.json, in the quant
file's entry: the mean and least cosine to the F16 vector of the same text, and the top-10 neighbour overlap (each
text's 10 nearest other texts under F16 and under the quant, the mean share in common). A file made again gets a
new entry, so a figure never outlives the file it was measured on. `runner plan` shows these figures and
`--prefer balanced` trusts only them.

Time: both files embed the same texts, one file at a time, each planned for this machine (GPU layers where they
fit). The default probe is kept within DEFAULT_SECONDS: the speed measured on the first texts projects the rest
(the quant counted as fast as F16), and the probe is cut to what fits, saying so (`--limit N` asks for N texts
whatever the time). When a quant is made (`runner quantize`, or a run that produces one), the whole probe is
measured only when it is projected within AUTO_SECONDS; otherwise a line says how to run it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import numpy as np

from quantize import manifest
from quantize.errors import BadInput, ModelNotFound, UserError
from quantize.imatrix import CalibrationText, calibration_texts
from quantize.progress import SILENT, Progress
from quantize.quants import UNQUANTIZED
from quantize.store import on_disk

PROBE = "probe.jsonl"  # shipped in runner/data/
TOP_K = 10
DEFAULT_SECONDS = 600.0  # `runner retention` without --limit: the probe is cut to fit this
AUTO_SECONDS = 60.0  # when a quant is made: measured only if the whole probe fits this
_STEP = 16  # texts per engine call, at most: calls of 1, 1, 2, 4 ... texts project the time early
_TIMED = 2.0  # seconds of embedding (after the warm-up) a projection of the time is made from, at least


def probe_path() -> Path:
    return Path(str(resources.files("runner").joinpath("data", PROBE)))


@dataclass(frozen=True)
class Retention:
    """One quant file's figures against its reference (the unquantized file of the same conversion)."""

    mean_cosine: float
    min_cosine: float
    top10_overlap: float
    texts: int
    probe: str  # the probe file's name (PROBE) or the --texts path
    reference: str  # the reference file's name
    measured_at: str  # ISO 8601, UTC

    def as_json(self) -> dict:
        return {
            "mean_cosine": round(self.mean_cosine, 6),
            "min_cosine": round(self.min_cosine, 6),
            "top10_overlap": round(self.top10_overlap, 4),
            "texts": self.texts,
            "probe": self.probe,
            "reference": self.reference,
            "measured_at": self.measured_at,
        }

    def summary(self) -> str:
        return (
            f"mean cosine {self.mean_cosine:.5f}, min {self.min_cosine:.5f}, top-{TOP_K} overlap "
            f"{self.top10_overlap:.3f} over {self.texts} texts"
        )


# --- maths ----------------------------------------------------------------------------------------
def neighbours(vectors: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of each row's K nearest other rows by cosine (rows are unit vectors), unordered."""
    k = min(k, len(vectors) - 1)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of neighbours in common between two neighbour-index arrays of equal shape."""
    shared = [len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(a, b, strict=True)]
    return float(np.mean(shared)) / a.shape[1]


def compare(reference: np.ndarray, vectors: np.ndarray) -> tuple[float, float, float]:
    """(mean cosine, least cosine, top-10 overlap) of VECTORS against REFERENCE, row for row (unit vectors)."""
    cos = np.sum(reference * vectors, axis=1)
    near = overlap(neighbours(reference), neighbours(vectors)) if len(reference) > 1 else 1.0
    return float(cos.mean()), float(cos.min()), near


# --- embedding ------------------------------------------------------------------------------------
class OverBudget(Exception):
    """The probe would take longer than allowed (projected SECONDS)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"projected {seconds:.0f} s")
        self.seconds = seconds


Budget = Callable[[list[int], int, float], int]


def embed(
    path: Path,
    texts: Sequence[CalibrationText],
    threads: int | None = None,
    budget: Budget | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> np.ndarray:
    """TEXTS' unit vectors from the GGUF at PATH (queries with the model's query prompt), planned for this machine.

    Texts go to the engine in steps of 1, 1, 2, 4 ... up to _STEP texts. The first step warms the engine up; once
    the texts after it have taken _TIMED seconds, BUDGET(tokens, done, seconds) is asked after each step how many
    texts to embed in all (TOKENS: each text's token count; DONE texts so far; SECONDS the texts after the first
    took): fewer than len(TEXTS) stops there, and it may raise OverBudget.
    """
    from runner.pipeline import Stats, open_pipeline

    counted = Stats()  # texts cut at the model's max length are compared cut: no warning for each call
    with open_pipeline(str(path), auto_quant=True, threads=threads, progress=SILENT) as pipe:
        tokens = [len(pipe.tokenize([t.text], query=t.query).seqs[0]) for t in texts]
        out: list[np.ndarray] = []
        total, size, started = len(texts), 1, 0.0
        while len(out) < total:
            step = texts[len(out) : min(total, len(out) + size)]
            rows: list[np.ndarray | None] = [None] * len(step)
            for query in (True, False):  # the model's query prompt on queries
                at = [i for i, t in enumerate(step) if t.query == query]
                if at:
                    vectors = pipe.embed([step[i].text for i in at], query=query, stats=counted)
                    for i, vector in zip(at, vectors, strict=True):
                        rows[i] = vector
            out.extend(rows)
            if len(out) == 1:
                started = clock()  # the first text warmed the engine up: the clock starts now
            elif budget is not None and (spent := clock() - started) >= _TIMED:
                total = min(total, max(len(out), budget(tokens, len(out), spent)))
            size = min(2 * size if len(out) > 1 else 1, _STEP)
        return np.stack(out)


def projected(tokens: Sequence[int], done: int, seconds: float, files: int) -> float:
    """Seconds for FILES files over all TOKENS (per text), from texts 2..DONE having taken SECONDS on one file."""
    per_token = seconds / max(1, sum(tokens[1:done]))
    return per_token * (files * sum(tokens) - sum(tokens[:done]))


# --- the command ----------------------------------------------------------------------------------
def reference_file(directory: Path) -> Path:
    """The unquantized file (F16, else F32 or BF16) a directory's quants are compared with."""
    files = on_disk(directory)
    for kind in ("F16", *UNQUANTIZED):
        if kind in files:
            return files[kind]
    raise ModelNotFound(
        f"{directory}: no F16 file to compare the quants with (removed with --no-keep-f16?); "
        "`runner convert` makes it again"
    )


def measure(
    directory: Path,
    quants: Sequence[str] | None = None,
    texts_file: Path | None = None,
    limit: int | None = None,
    seconds: float = DEFAULT_SECONDS,
    threads: int | None = None,
    cut: bool = True,
    progress: Progress = SILENT,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Retention]:
    """Measure QUANTS (default: every quant file in DIRECTORY) against the reference file and record each in
    DIRECTORY's manifest.json.

    LIMIT: the first LIMIT probe texts, whatever the time. Else the probe is kept within SECONDS for all files:
    cut to what fits (CUT) or not measured at all (OverBudget, when CUT is False: what a quant's making uses).
    """
    files = on_disk(directory)
    quants = [q.upper() for q in quants] if quants else [q for q in files if q not in UNQUANTIZED]
    if missing := [q for q in quants if q not in files]:
        raise BadInput(f"{directory}: no {missing[0]} file; on disk: {', '.join(files) or 'none'}")
    if not quants:
        raise BadInput(f"{directory}: no quant to measure; `runner quantize` makes one")
    if unquantized := [q for q in quants if q in UNQUANTIZED]:
        raise BadInput(f"--quant {unquantized[0]}: the quants are measured against it; name a quant")
    reference = reference_file(directory)
    texts = calibration_texts(texts_file or probe_path())
    if limit is not None:
        if limit < 2:
            raise BadInput(f"--limit {limit}: at least 2 texts (neighbours need two)")
        texts = texts[:limit]
    n_files = 1 + len(quants)

    def within(tokens: list[int], done: int, spent: float) -> int:
        """All the texts while the projection for every file fits SECONDS; else as many as fit (or OverBudget)."""
        if limit is not None or (need := projected(tokens, done, spent, n_files)) <= seconds:
            return len(texts)
        if not cut:
            raise OverBudget(need)
        per_token = spent / max(1, sum(tokens[1:done])) * n_files
        left, fits = seconds - spent * n_files, done
        while fits < len(texts) and (left := left - tokens[fits] * per_token) >= 0:
            fits += 1
        return max(fits, min(len(texts), TOP_K + 1))  # enough texts for the neighbour overlap

    started = time.perf_counter()
    progress.say(f"retention: embedding {len(texts)} probe texts with {reference.name}")
    ref = embed(reference, texts, threads, within, clock)
    if len(ref) < len(texts):
        progress.say(
            f"retention: {len(ref)} of {len(texts)} probe texts, to stay within {seconds / 60:.0f} minutes on this "
            f"machine; --limit {len(texts)} measures them all"
        )
    used = texts[: len(ref)]
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    probe = str(texts_file) if texts_file else PROBE
    found: dict[str, Retention] = {}
    for quant in quants:
        vectors = embed(files[quant], used, threads)
        mean, least, near = compare(ref, vectors)
        found[quant] = Retention(mean, least, near, len(used), probe, reference.name, stamp)
        manifest.record_retention(files[quant], found[quant].as_json())
    progress.say(f"retention: {time.perf_counter() - started:.0f} s; recorded in {directory / manifest.MANIFEST}")
    return found


def quant_of(path: Path) -> str:
    """The quant of the GGUF file PATH, as its directory's files are named (<name>-<QUANT>.gguf)."""
    found = [q for q, p in on_disk(path.parent).items() if p.name == path.name]
    if not found:
        raise BadInput(f"{path}: not a <name>-<QUANT>.gguf file of a model directory; pass the directory and --quant")
    return found[0]


def after_quantize(made: Path, threads: int | None = None, progress: Progress = SILENT) -> Retention | None:
    """Measure a quant just MADE when the whole probe fits AUTO_SECONDS on this machine; else say how to."""
    quant = quant_of(made)
    how = f"`runner retention -m {made.parent} --quant {quant}` measures it"
    try:
        figures = measure(made.parent, [quant], seconds=AUTO_SECONDS, threads=threads, cut=False)[quant]
    except OverBudget as e:
        progress.say(
            f"retention of {made.name} not measured: about {math.ceil(e.seconds / 60)} min on this machine, over "
            f"{AUTO_SECONDS:.0f} s; {how}"
        )
        return None
    except UserError as e:  # no F16 beside it, or it does not fit this machine
        progress.say(f"retention of {made.name} not measured: {e}")
        return None
    progress.say(f"retention {made.name}: {figures.summary()}")
    return figures
