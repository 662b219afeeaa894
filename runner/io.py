"""Reading texts (.txt, .jsonl, stdin) and writing vectors (.npy, .jsonl, .parquet), atomically.

Large runs stream: texts are read lazily, vectors go to `<output>.parts/` one chunk at a time (each
part written atomically), and the output file is assembled from the parts when the last one is done.
`--resume` reuses the parts of an interrupted run with the same model and options (the run key in
parts/run.json) and the same texts (each part's name carries the digest of every text up to its end).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from quantize.errors import BadInput
from quantize.files import atomic_path, write_text_atomic
from quantize.manifest import content_sha256

FORMATS = ("npy", "jsonl", "parquet")
DTYPES = {"float32": np.float32, "float16": np.float16}


def read_texts(path: str, field: str = "text", errors: str = "strict") -> Iterator[str]:
    """One text per line of a .txt file; in a .jsonl file, each line a JSON string or an object with FIELD.

    Read lazily, line by line, so any input size runs in flat memory. `-` reads plain lines from stdin.
    ERRORS="replace" puts U+FFFD for bytes that are not UTF-8 instead of stopping with the line number.
    """
    if path == "-":
        yield from _parse_lines(sys.stdin.buffer, "<stdin>", False, field, errors)
        return
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{path}: no such input file")
    with open(p, "rb") as f:
        yield from _parse_lines(f, path, p.suffix.lower() == ".jsonl", field, errors)


def count_lines(path: str) -> int | None:
    """Lines in PATH (for a progress bar's total), read in blocks; None for stdin or a missing file."""
    p = Path(path)
    if path == "-" or not p.is_file():
        return None
    n, last = 0, b"\n"
    with open(p, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _parse_lines(lines: Iterable[bytes], name: str, jsonl: bool, field: str, errors: str) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8", errors).rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise BadInput(
                f"{name}:{n}: not valid UTF-8 ({e.reason} at byte {e.start}); fix the file or pass --errors replace"
            ) from None
        if not jsonl:
            yield text
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"{name}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(obj, str):
            yield obj
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise BadInput(f"{name}:{n}: no string field {field!r}; choose the field with --field")
        yield obj[field]


def output_format(path: str | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    if path and Path(path).suffix.lower().lstrip(".") in FORMATS:
        return Path(path).suffix.lower().lstrip(".")
    if path:
        raise BadInput(f"{path}: cannot tell the format from the extension; pass --format npy or jsonl")
    return "jsonl"


class VectorSink:
    """Where a run's vectors go: stdout (JSON lines as they come) or OUTPUT, assembled from chunk parts."""

    def __init__(self, path: str | None, fmt: str, dtype: str, run_key: str, resume: bool) -> None:
        if fmt == "parquet":
            _pyarrow()
        if path is None and fmt != "jsonl":
            raise BadInput(f"--format {fmt} needs --output FILE (binary output is not written to a terminal)")
        self.path = Path(path) if path else None
        self.fmt, self.dtype = fmt, DTYPES[dtype]
        self.parts = self.path.with_name(self.path.name + ".parts") if self.path else None
        self.written: list[Path] = []
        self.printed = 0
        if self.parts is None:
            return
        run = self.parts / "run.json"
        if resume and run.is_file():
            if json.loads(run.read_text()).get("run") != run_key:
                raise BadInput(
                    f"{self.parts}: left by a run with another model or options; delete it or run without --resume"
                )
            return
        shutil.rmtree(self.parts, ignore_errors=True)
        self.parts.mkdir(parents=True)
        write_text_atomic(run, json.dumps({"run": run_key}) + "\n")

    def done(self, chunk: int, digest: str) -> bool:
        """Whether an interrupted run left CHUNK for the same texts (DIGEST); a part for other texts is an error."""
        if self.parts is None:
            return False
        found = sorted(self.parts.glob(f"{chunk:06d}-*.npy"))
        if not found:
            return False
        if found[0] != self._part(chunk, digest):
            raise BadInput(
                f"{self.parts}: left by a run with other inputs (they differ by text {chunk} of the chunks); "
                "delete it or run without --resume"
            )
        self.written.append(found[0])
        return True

    def _part(self, chunk: int, digest: str) -> Path:
        assert self.parts is not None
        return self.parts / f"{chunk:06d}-{digest[:16]}.npy"

    def write(self, chunk: int, digest: str, vectors: np.ndarray, first: int) -> None:
        if self.parts is None:
            for i, v in enumerate(vectors, first):
                sys.stdout.write(json.dumps({"id": i, "embedding": v.astype(np.float32).tolist()}) + "\n")
            sys.stdout.flush()
            return
        part = self._part(chunk, digest)
        with atomic_path(part) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, vectors.astype(self.dtype))
        self.written.append(part)

    def abandon(self) -> None:
        """After a failed run: drop the parts folder if this run left no vectors in it (nothing to resume)."""
        if self.parts is not None and not any(self.parts.glob("*.npy")):
            shutil.rmtree(self.parts, ignore_errors=True)

    def finish(self, dims: int) -> None:
        """Assemble OUTPUT from this run's parts, in order (atomically), then remove them."""
        if self.path is None or self.parts is None:
            return
        parts = [np.load(p, mmap_mode="r") for p in self.written]
        n = sum(len(p) for p in parts)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            if self.fmt == "npy":
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(n, dims))
                start = 0
                for p in parts:
                    out[start : start + len(p)] = p
                    start += len(p)
                out.flush()
                del out
            elif self.fmt == "jsonl":
                with open(tmp, "w", encoding="utf-8") as f:
                    i = 0
                    for p in parts:
                        for v in p:
                            f.write(json.dumps({"id": i, "embedding": v.astype(np.float32).tolist()}) + "\n")
                            i += 1
            else:
                _write_parquet(tmp, parts, dims)
        del parts
        shutil.rmtree(self.parts, ignore_errors=True)


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet
    except ImportError:
        raise BadInput("--format parquet needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _write_parquet(path: Path, parts: list[np.ndarray], dims: int) -> None:
    pa = _pyarrow()
    writer = None
    start = 0
    for p in parts:
        values = pa.array(np.ascontiguousarray(p).reshape(-1))
        table = pa.table(
            {
                "id": pa.array(np.arange(start, start + len(p))),
                "embedding": pa.FixedSizeListArray.from_arrays(values, dims),
            }
        )
        writer = writer or pa.parquet.ParquetWriter(str(path), table.schema)
        writer.write_table(table)
        start += len(p)
    if writer is None:  # no texts: an empty table with the same columns
        empty = pa.table({"id": pa.array([], pa.int64()), "embedding": pa.array([], pa.list_(pa.float32(), dims))})
        writer = pa.parquet.ParquetWriter(str(path), empty.schema)
    writer.close()


def run_key(model: Path, options: dict) -> str:
    """What a resumed run must share with the interrupted one besides its texts: the model's content (its sha256,
    taken from manifest.json while the file is unchanged) and the options."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": content_sha256(model), **options}).encode())
    return h.hexdigest()
