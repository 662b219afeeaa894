"""Writing vectors (.npy, .jsonl, .parquet), atomically; texts are read by runner/inputs.py.

Large runs stream: texts are read lazily, vectors go to `<output>.parts/` one chunk at a time (each
part written atomically), and the output file is assembled from the parts when the last one is done.
`--resume` reuses the parts of an interrupted run with the same model and options (the run key in
parts/run.json: the model's sha256, not its path) and the same texts (each part's name carries the digest
of every text up to its end). One run at a time owns an output (`OutputLock`), and a full disk is a
one-line error that keeps the parts for `--resume`.

Every output file names what made it: the model file (name, quant, file name, sha256) and the options, in a
parquet file's schema metadata, or beside a .npy/.jsonl file in `<output>.json` (`sidecar_path`). Vectors
streamed to stdout or a pipe carry nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from quantize.errors import BadInput, DiskFull
from quantize.files import atomic_path, write_text_atomic
from quantize.manifest import content_sha256
from runner import compact

FORMATS = ("npy", "jsonl", "parquet")
log = logging.getLogger("runner")


def output_format(path: str | None, fmt: str | None) -> str:
    """FMT, else -o PATH's extension; jsonl for stdout and for a stream (/dev/stdout, a FIFO), which takes
    nothing else: npy and parquet are written whole beside the output and renamed into place."""
    suffix = Path(path).suffix.lower().lstrip(".") if path else ""
    fmt = fmt or (suffix if suffix in FORMATS else None)
    if path is not None and is_stream(Path(path)):
        if fmt not in (None, "jsonl"):
            raise BadInput(
                f"{path}: a stream (character device or FIFO), and {fmt} is written whole and renamed into place: "
                "-o a file, or --format jsonl to stream into it"
            )
        return "jsonl"
    if fmt:
        return fmt
    if path:
        raise BadInput(f"{path}: cannot tell the format from the extension; pass --format npy, jsonl or parquet")
    return "jsonl"


def is_stream(output: Path) -> bool:
    """-o OUTPUT is a stream, written through as vectors come, like `> OUTPUT`: a character device or a FIFO
    (/dev/stdout, /dev/null, a named pipe, or a link to one). Otherwise it is a file (missing or regular), written
    beside it and renamed into place. Anything else is refused: a link to a file (the rename would replace the
    link, never write its target), a directory, a block device, a socket."""
    try:
        mode: int | None = os.stat(output).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise BadInput(f"{output}: cannot write it ({e.strerror})") from None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return True
    if output.is_symlink():
        raise BadInput(
            f"{output}: a link to {os.path.realpath(output)}; outputs are written beside their name and renamed into "
            "place, which would replace the link: -o the file it points to, or remove the link"
        )
    if mode is not None and not stat.S_ISREG(mode):
        raise BadInput(f"{output}: not a regular file (a directory, block device or socket); choose another -o")
    return False


class OutputLock:
    """`<output>.lock`: while one run holds it no other run writes OUTPUT (two runs into one file mixed their rows).

    An flock, so the kernel drops it when its holder dies, however it dies: a crashed run's lock is never stale
    and nothing has to guess from PIDs. The holder writes its PID into the file, to be named to a refused run.
    The lock is opened without following a link (a link there would make the PID write truncate its target);
    a stream output (/dev/stdout) has no lock: nothing is assembled into it.
    """

    def __init__(self, output: Path, option: str = "-o") -> None:
        """OPTION: what the refused run changes to write elsewhere, for its message."""
        self.output, self.option = output, option
        self.path = output.with_name(output.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        if is_stream(self.output):
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise BadInput(
                    f"{self.output}: another run (PID {holder}) is writing it; wait for it to end or choose another "
                    f"{self.option}"
                ) from None
            try:  # a holder that ended removed the file between our open and our lock: lock the new file instead
                if os.fstat(fd).st_ino == os.lstat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BadInput(f"{self.path}: a link where the output's lock goes; remove it") from None
            raise BadInput(f"{self.path}: cannot create the output's lock ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BadInput(f"{self.path}: not a regular file where the output's lock goes; remove it")
        return fd

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # still holding it, so no other run can have it
            os.close(self.fd)
            self.fd = None


class VectorSink:
    """Where a run's vectors go: stdout or a stream (JSON lines as they come), or OUTPUT, assembled from parts."""

    def __init__(
        self,
        path: str | None,
        fmt: str,
        dtype: str,
        run_key: str,
        resume: bool,
        ranges: np.ndarray | None = None,
        *,
        dims: int,
        options: dict[str, object] | None = None,
    ) -> None:
        """DTYPE: a precision (runner/compact.py); int8/uint8 with RANGES, else with ranges from all the vectors.
        DIMS: the width of every vector (and of every part an interrupted run left). OPTIONS: the command-line
        options RUN_KEY covers, by name (`--query`: True), kept in parts/run.json so that a resume refused for
        another option names it."""
        if fmt == "parquet":
            _pyarrow()
        stream = path is None or is_stream(Path(path))
        if stream and fmt != "jsonl":
            raise BadInput(f"--format {fmt} needs --output FILE (binary output is not written to a terminal)")
        self.precision, self.ranges, self.dims = compact.check_precision(dtype), ranges, dims
        if stream and dtype in compact.RANGED and ranges is None:
            raise BadInput(
                f"--precision {dtype} to {path or 'stdout'} needs --ranges or --calibration: ranges from the data "
                "itself are known only once every vector is, and would be lost with no file to save them beside"
            )
        # The parts' dtype: int8/uint8/binary are made at the end, once every vector's range is known.
        self.fmt, self.dtype = fmt, np.dtype(np.float16 if dtype == "float16" else np.float32)
        self.written: list[Path] = []
        self.printed = 0  # vectors sent to the stream
        self.path: Path | None = None
        self.parts: Path | None = None
        self.stream: TextIO | None = None
        if stream:
            self.stream = sys.stdout if path is None else _open_stream(Path(path))
            return
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        if self.parts.is_symlink() or (self.parts.exists() and not self.parts.is_dir()):
            raise BadInput(f"{self.parts}: not a folder of parts (a link or a file) where one goes; remove it")
        run = self.parts / "run.json"
        if resume and run.is_file() and not run.is_symlink():
            try:
                left = json.loads(run.read_text())
                same, before = left.get("run") == run_key, left.get("options")
            except (ValueError, AttributeError):
                same, before = False, None
            if not same:
                raise BadInput(f"{self.parts}: left by a run with {_differs(before, options or {})}; run with the "
                               "same options to resume, or without --resume to start again")  # fmt: skip
            return
        shutil.rmtree(self.parts, ignore_errors=True)
        with self._writing(run, 4096):
            self.parts.mkdir(parents=True)
            write_text_atomic(run, json.dumps({"run": run_key, "options": options or {}}) + "\n")

    @contextlib.contextmanager
    def _writing(self, path: Path, need: int | None) -> Iterator[None]:
        """An OSError while writing PATH as one line naming it; a full disk also says the bytes NEED(ed), the
        bytes free and what is kept for --resume."""
        try:
            yield
        except OSError as e:
            kept = ""
            if saved := self.saved():
                kept = f"; the {saved} texts done are kept in {self.parts}: the same command with --resume goes on"
            free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                needs = f"needs {need} bytes, " if need is not None else ""
                raise DiskFull(f"{path}: disk full ({needs}{free} bytes free){kept}") from None
            raise BadInput(f"{path}: cannot write it ({e.strerror or e}){kept}") from None

    def saved(self) -> int:
        """Texts in the complete parts on disk: what --resume will not embed again. Counted on disk, not as
        parts are written, so a signal between a part's rename and the count cannot make it wrong."""
        if self.parts is None or not self.parts.is_dir():
            return 0
        total = 0
        for p in self.parts.glob("*.npy"):
            with contextlib.suppress(OSError, ValueError):  # a damaged part saves nothing: it is embedded again
                total += self._rows(p)
        return total

    def interrupted(self) -> str:
        """What an interrupted run leaves, for the line it ends with."""
        if self.parts is None:
            return f"{self.printed} vectors were printed"
        if not (saved := self.saved()):
            return "nothing was written"
        return f"{saved} texts are safely on disk in {self.parts}; the same command with --resume continues"

    def part_rows(self, chunk: int) -> int | None:
        """How many texts CHUNK of an interrupted run holds, by its name (None: no such part). Parts end by time or
        by --chunk-size, so a resumed run takes its boundaries from them; `done` then checks the part itself."""
        if self.parts is None:
            return None
        for part in sorted(self.parts.glob(f"{chunk:06d}-*.npy")):
            count = part.name.split("-")[1]
            return int(count) if count.isdigit() else None
        return None

    def done(self, chunk: int, digest: str, count: int) -> bool:
        """Whether an interrupted run left CHUNK, the COUNT texts that end with DIGEST, whole. A part for other
        texts is an error; a damaged one (another shape or dtype, cut short, not a plain file) is removed, with
        a warning, and its texts are embedded again."""
        if self.parts is None:
            return False
        found = sorted(self.parts.glob(f"{chunk:06d}-*.npy"))
        if not found:
            return False
        part = self._part(chunk, count, digest)
        if found[0] != part:
            raise BadInput(
                f"{self.parts}: left by a run with other inputs (they differ by text {chunk} of the chunks); "
                "delete it or run without --resume"
            )
        try:
            rows = self._rows(part)
            if rows != count:
                raise ValueError(f"{rows} vectors, not the {count} of its texts")
        except (OSError, ValueError) as e:
            log.warning("%s: damaged (%s); embedding its %d texts again", part, e, count)
            with self._writing(part, None):
                part.unlink()
            return False
        self.written.append(part)
        return True

    def _rows(self, part: Path) -> int:
        """The vectors in PART, once it is known to be whole: a regular file holding a (rows, dims) array of the
        run's dtype, every byte its header promises there. ValueError (or OSError) says what is wrong."""
        fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            shape, fortran, dtype = read_npy_header(f)
            if fortran or dtype != self.dtype or len(shape) != 2 or shape[1] != self.dims:
                raise ValueError(f"a {dtype} {shape} array, not {self.dims}-wide {self.dtype} vectors")
            if size != f.tell() + shape[0] * self.dims * dtype.itemsize:
                raise ValueError(f"{size} bytes, not the {f.tell() + shape[0] * self.dims * dtype.itemsize} "
                                 "its header promises")  # fmt: skip
        return shape[0]

    def _part(self, chunk: int, count: int, digest: str) -> Path:
        """Part CHUNK's file: its index, its COUNT texts (the boundary a resumed run keeps), and the DIGEST of every
        text up to its end."""
        assert self.parts is not None
        return self.parts / f"{chunk:06d}-{count}-{digest[:16]}.npy"

    def write(self, chunk: int, digest: str, vectors: np.ndarray, first: int) -> None:
        if self.stream is not None:
            for i, v in enumerate(compact.quantize(vectors, self.precision, self.ranges), first):
                self.stream.write(json.dumps({"id": i, "embedding": _json_row(v)}) + "\n")
            self.stream.flush()
            self.printed += len(vectors)
            return
        part = self._part(chunk, len(vectors), digest)
        data = np.ascontiguousarray(vectors, dtype=self.dtype)
        header = _npy_header(data.shape, self.dtype)
        with self._writing(part, len(header) + data.nbytes), atomic_path(part) as tmp:
            with open(tmp, "wb") as f:  # f.write, not np.save: its tofile() loses the errno of a full disk
                f.write(header)
                f.write(data.data)
        self.written.append(part)

    def abandon(self) -> None:
        """After a failed run: drop the parts folder if this run left no vectors in it (nothing to resume)."""
        self._close_stream()
        if self.parts is not None and not any(self.parts.glob("*.npy")):
            shutil.rmtree(self.parts, ignore_errors=True)

    def _close_stream(self) -> None:
        if self.stream is not None and self.stream is not sys.stdout:
            self.stream.close()

    def finish(self, metadata: dict[str, object] | None = None) -> Path | None:
        """Assemble OUTPUT from this run's parts, in order and in the run's precision (atomically), then remove
        them. Returns where int8/uint8 ranges were saved (beside OUTPUT, for quantizing queries alike).

        METADATA (what made the vectors), with the row count, goes into a parquet file's schema metadata, or into
        `<output>.json` beside a .npy/.jsonl file, written atomically after it; the sidecar of an output it
        replaces is removed first, so a crash in between leaves an output with no sidecar, never with another's.
        """
        self._close_stream()
        if self.path is None or self.parts is None:
            return None
        parts = [np.load(p, mmap_mode="r") for p in self.written]
        n = sum(len(p) for p in parts)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        saved, ranges, precision = None, self.ranges, self.precision
        if precision in compact.RANGED:
            if ranges is None:  # from the data itself: one pass over the parts, a chunk at a time
                found = compact.Ranges()
                for p in parts:
                    found.update(np.asarray(p))
                ranges = found.result()
            saved = compact.ranges_path(self.path)
            with self._writing(saved, ranges.nbytes + 128), atomic_path(saved) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, ranges)
        rows = (compact.quantize(np.asarray(p), precision, ranges) for p in parts)
        out_dtype, dims = compact.DTYPES[precision], compact.width(precision, self.dims)
        described, sidecar = (None if metadata is None else metadata | {"rows": n}), sidecar_path(self.path)
        header = _npy_header((n, dims), out_dtype)
        nbytes = len(header) + n * dims * np.dtype(out_dtype).itemsize
        with self._writing(self.path, nbytes if self.fmt == "npy" else None), atomic_path(self.path) as tmp:
            if self.fmt == "npy":
                # Written, not memory-mapped: a full disk under a memory map is a SIGBUS that kills the process
                # with no message. The space is claimed first, so a full disk fails before any data is written.
                with open(tmp, "wb") as f:
                    _reserve(f, nbytes)
                    f.write(header)
                    for q in rows:
                        f.write(q.data)
            elif self.fmt == "jsonl":
                with open(tmp, "w", encoding="utf-8") as f:
                    i = 0
                    for q in rows:
                        for v in q:
                            f.write(json.dumps({"id": i, "embedding": _json_row(v)}) + "\n")
                            i += 1
            else:
                _write_parquet(tmp, rows, dims, out_dtype, described)
            if self.fmt != "parquet":
                sidecar.unlink(missing_ok=True)  # it described the output this one replaces
        if described is not None and self.fmt != "parquet":
            with self._writing(sidecar, None):
                write_text_atomic(sidecar, json.dumps(described, indent=2) + "\n")
        del parts
        shutil.rmtree(self.parts, ignore_errors=True)
        return saved


# run.json's option names as the command line spells them, for a refused resume's message.
_OPTION_NAMES = {"query": "--query/--document", "task": "--task", "normalize": "--normalize/--no-normalize",
                 "max_length": "--max-length", "fmt": "--format", "dtype": "--precision", "dimensions": "--dimensions",
                 "skip_empty": "--skip-empty"}  # fmt: skip


def _differs(before: object, now: dict[str, object]) -> str:
    """What differs between the interrupted run's options BEFORE and this run's NOW, for a refused resume."""
    if not isinstance(before, dict):
        return "another model or options"
    names = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if not names:
        return "another model (its sha256 differs)"
    said = [f"{_OPTION_NAMES.get(k, k)} {before.get(k)!r}, now {now.get(k)!r}" for k in names]
    return "other options: " + "; ".join(said)


def _json_row(v: np.ndarray) -> list:
    """A vector as JSON numbers: integers for the compact precisions, float32 values for the float ones."""
    return v.tolist() if np.issubdtype(v.dtype, np.integer) else v.astype(np.float32).tolist()


def _npy_header(shape: tuple[int, ...], dtype: type) -> bytes:
    """The .npy header np.save writes for an array of SHAPE and DTYPE (format 1.0)."""
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, d)
    return buf.getvalue()


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from the .npy header at F's position, leaving F at the data; ValueError for
    anything that is not a .npy header np.save writes (an .npz, a pickle, format 3.0)."""
    version = np.lib.format.read_magic(f)
    if version not in _HEADER_READERS:
        raise ValueError(f".npy format version {version} is not one this reads")
    return _HEADER_READERS[version](f)


def load_ranges(path: str | Path, dims: int) -> np.ndarray:
    """int8/uint8 ranges saved by an earlier run (or by hand: a .npy of a (2, DIMS) float32 or float64 array of
    minima over maxima), checked by `compact.check_ranges`; the header is checked before any data is read, so a
    file claiming a huge shape costs nothing."""
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = read_npy_header(f)
            if shape != (2, dims) or dtype.kind != "f" or dtype.itemsize not in (4, 8):
                raise BadInput(
                    f"{path}: ranges must be a (2, {dims}) float32 or float64 array (row 0 the minima, row 1 the "
                    f"maxima), not {dtype} {shape}; use the <output>.ranges.npy a run saved"
                )
            data = f.read(2 * dims * dtype.itemsize + 1)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else e
        raise BadInput(f"{path}: not a ranges .npy file ({reason}); use the <output>.ranges.npy a run saved") from None
    if len(data) != 2 * dims * dtype.itemsize:
        raise BadInput(f"{path}: {len(data)} bytes of ranges, not the {2 * dims * dtype.itemsize} its header says")
    return compact.check_ranges(np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C"), dims, path)


def _open_stream(path: Path) -> TextIO:
    """PATH opened to write through, as `> PATH` does; refused if it stopped being a stream since it was checked."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise BadInput(f"{path}: cannot write it ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        os.close(fd)
        raise BadInput(f"{path}: changed from a stream to a file while it was opened; run again")
    return open(fd, "w", encoding="utf-8")


def _reserve(f, nbytes: int) -> None:
    """Claim NBYTES of disk for F now (ENOSPC here, not halfway through)."""
    if nbytes <= 0:
        return
    try:
        os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system without fallocate: the writes will say
            raise


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet
    except ImportError:
        raise BadInput("--format parquet needs pyarrow: pip install pyarrow") from None
    return pyarrow


def sidecar_path(output: Path) -> Path:
    """`<output>.json`: what made a .npy or .jsonl OUTPUT's vectors (VectorSink.finish)."""
    return output.with_name(output.name + ".json")


PARQUET_METADATA_KEY = b"embedrunner"  # a parquet output's schema metadata: the JSON a sidecar would hold


def _write_parquet(
    path: Path, parts: Iterable[np.ndarray], dims: int, dtype: type = np.float32, metadata: dict | None = None
) -> None:
    """`id` and `embedding`, a fixed-size list of DTYPE (float32, float16, int8 or uint8); METADATA as JSON in the
    schema's metadata under PARQUET_METADATA_KEY."""
    pa = _pyarrow()
    described = {PARQUET_METADATA_KEY: json.dumps(metadata).encode()} if metadata is not None else None
    writer = None
    start = 0
    for p in parts:
        values = pa.array(np.ascontiguousarray(p).reshape(-1))
        table = pa.table(
            {
                "id": pa.array(np.arange(start, start + len(p))),
                "embedding": pa.FixedSizeListArray.from_arrays(values, dims),
            },
            metadata=described,
        )
        writer = writer or pa.parquet.ParquetWriter(str(path), table.schema)
        writer.write_table(table)
        start += len(p)
    if writer is None:  # no texts: an empty table with the same columns
        column = pa.list_(pa.from_numpy_dtype(dtype), dims)
        empty = pa.table({"id": pa.array([], pa.int64()), "embedding": pa.array([], column)}, metadata=described)
        writer = pa.parquet.ParquetWriter(str(path), empty.schema)
    writer.close()


def run_key(model: Path, options: dict) -> str:
    """What a resumed run must share with the interrupted one besides its texts: the model's content (its sha256,
    taken from manifest.json while the file is unchanged) and the options."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": content_sha256(model), **options}).encode())
    return h.hexdigest()
