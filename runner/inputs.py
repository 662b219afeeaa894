"""Reading texts: the one reader behind `runner embed --input` and `runner embed-dataset`.

`.txt`: one text per line. `.jsonl`: per line a JSON string, or an object with the text in FIELD (and an id in
ID_FIELD). `.csv`/`.tsv`: a table whose header row names its columns, the text in column FIELD (Python's csv
module: quoted cells may hold commas, tabs and line breaks). `.parquet`: the string column FIELD (and ID_FIELD).
`-`: lines from stdin. A file means the same wherever it is read: every line or row is one text, so an empty or
null cell, a value that is not a string, and bytes that are not UTF-8 (unless errors="replace") are errors naming
the file and the line or row; nothing becomes the string "None". A blank line or empty cell is an error too,
unless SKIP_EMPTY: then it is read as None, so that callers keep rows aligned (runner embed lists the skipped
rows in its output's metadata; embed-dataset's ids are row numbers). Lines and rows are numbered from 1.

A read may start at a line's byte offset or at a row (`start`/`stop`): how embed-dataset's workers read their
shard of a large file without scanning it.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from quantize.errors import BadInput

INPUT_SUFFIXES = (".parquet", ".jsonl", ".txt", ".csv", ".tsv")
TABLES = {".csv": ",", ".tsv": "\t"}  # text tables, and their delimiters
_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "an array", dict: "an object"}  # fmt: skip


def read_texts(
    path: str, field: str = "text", errors: str = "strict", skipped: list[int] | None = None
) -> Iterator[str]:
    """The texts of PATH (see the module's docstring), read lazily: any input size runs in flat memory. With
    SKIPPED (a list), blank lines and empty cells are left out and their row numbers appended to it."""
    if path != "-" and "://" not in path and not Path(path).is_file():
        raise BadInput(f"{path}: no such input file")
    records = read_records(path, field, errors=errors, skip_empty=skipped is not None)
    for n, (_, text) in enumerate(records, 1):
        if text is None:
            assert skipped is not None
            skipped.append(n)
        else:
            yield text


def read_records(
    path: str,
    field: str = "text",
    id_field: str | None = None,
    *,
    errors: str = "strict",
    start: int = 0,
    stop: int | None = None,
    offset: int = 0,
    option: str = "--field",
    skip_empty: bool = False,
) -> Iterator[tuple[object, str | None]]:
    """(id, text) for lines/rows START to STOP (from 0) of PATH; the id is ID_FIELD's value (an int or a str),
    None without ID_FIELD. OFFSET: the byte where line START begins (.txt and .jsonl only). OPTION: the
    command-line option that names FIELD, for the messages. SKIP_EMPTY: a blank line or empty cell is
    (None, None), not an error."""
    suffix = Path(path).suffix.lower()
    if path == "-":
        yield from _read_lines(sys.stdin.buffer, "<stdin>", False, field, id_field, errors, start, stop, option,
                               skip_empty)  # fmt: skip
    elif suffix == ".parquet":
        with open_input(path) as f:
            yield from _read_parquet(f, path, field, id_field, start, stop, option, skip_empty)
    elif suffix in TABLES:
        with open_input(path) as f:
            yield from _read_table(f, path, TABLES[suffix], field, id_field, errors, start, stop, option, skip_empty)
    else:
        with open_input(path) as f:
            f.seek(offset)
            jsonl = suffix == ".jsonl"
            yield from _read_lines(f, path, jsonl, field, id_field, errors, start, stop, option, skip_empty)


def count_texts(path: str) -> int | None:
    """Texts in PATH (a progress bar's total) without parsing them; None for stdin."""
    if path == "-":
        return None
    if path.lower().endswith(".parquet"):
        with open_input(path) as f:
            return _pyarrow()[1].ParquetFile(f).metadata.num_rows
    if (suffix := Path(path).suffix.lower()) in TABLES:  # a quoted cell may span lines: rows are counted by parsing
        with open_input(path) as f:
            text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
            try:
                return max(0, sum(1 for _ in csv.reader(text, delimiter=TABLES[suffix])) - 1)  # less the header row
            except csv.Error as e:
                raise BadInput(f"{path}: not a valid {TABLES[suffix]!r}-separated table ({e})") from None
    return line_starts(path, sys.maxsize)[0]


def line_starts(path: str, every: int) -> tuple[int, list[int]]:
    """(lines in PATH, byte offset of lines 0, EVERY, 2 x EVERY, ...): one block-wise pass, no decoding."""
    offsets, n, pos, last = [0], 0, 0, b"\n"
    with open_input(path) as f:
        while block := f.read(1 << 24):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)  # vectorised: corpora are big
            # Line n + j + 1 starts after newline j; keep those that start a shard.
            ends = np.arange(n + 1, n + 1 + len(newlines))
            offsets += (pos + newlines[ends % every == 0] + 1).tolist()
            n += len(newlines)
            pos += len(block)
            last = block[-1:]
    lines = n + (last != b"\n" and pos > 0)
    return lines, offsets[: -(-lines // every)] if lines else []


def open_input(path: str):
    """A seekable binary file for a local path or an object-store URI (pyarrow's filesystems, as Ray's)."""
    if "://" not in path:
        try:
            return open(path, "rb")
        except OSError as e:
            raise BadInput(f"{path}: cannot read it ({e.strerror or e})") from None
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    return fs.open_input_file(inner)


def _read_lines(f, name, jsonl, field, id_field, errors, start, stop, option, skip_empty):
    for n, line in enumerate(_lines(f), start + 1):
        if stop is not None and n > stop:
            return
        where = f"{name}:{n}"
        try:
            text = line.decode("utf-8", errors).rstrip("\r")
        except UnicodeDecodeError as e:
            raise BadInput(
                f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); fix the file or pass --errors replace"
            ) from None
        if not text.strip():
            if skip_empty:
                yield None, None
                continue
            raise BadInput(f"{where}: blank line; every line is one text: remove it, or pass --skip-empty")
        if not jsonl:
            if id_field:
                raise BadInput(f"{name}: a .txt file has no {id_field!r} field; drop --id-column or use .jsonl")
            yield None, text
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError: also an integer of too many digits
            raise BadInput(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if isinstance(obj, str) and not id_field:
            yield None, _text(obj, where, "the string", skip_empty)
        elif isinstance(obj, dict):
            if field not in obj:
                raise BadInput(f"{where}: no field {field!r}; choose the field with {option}")
            text = _text(obj[field], where, f"field {field!r}", skip_empty)
            if text is None or not id_field:
                yield None, text
            elif id_field not in obj:
                raise BadInput(f"{where}: no field {id_field!r}; choose the id field with --id-column")
            else:
                yield _id(obj[id_field], where, f"field {id_field!r}"), text
        else:
            want = f"an object with field {id_field!r}" if id_field else f"a string or an object with field {field!r}"
            raise BadInput(f"{where}: {_JSON_TYPES.get(type(obj), 'a value')}, not {want}")


def _text(value: object, where: str, what: str, skip_empty: bool = False) -> str | None:
    """VALUE if it is a text; None for a blank one when SKIP_EMPTY; else a BadInput naming WHERE."""
    if not isinstance(value, str):
        found = _JSON_TYPES.get(type(value), type(value).__name__)
        raise BadInput(f"{where}: {what} is {found}, not a string; fill it or drop it")
    if not value.strip():
        if skip_empty:
            return None
        raise BadInput(f"{where}: {what} is blank; fill it or drop it, or pass --skip-empty")
    return value


def _id(value: object, where: str, what: str) -> int | str:
    if type(value) not in (int, str):  # bool is an int to Python, not an id
        found = _JSON_TYPES.get(type(value), type(value).__name__)
        raise BadInput(f"{where}: {what} is {found}; ids are integers or strings")
    return value  # type: ignore[return-value]


def _lines(f) -> Iterator[bytes]:
    """F's lines without their b"\\n", read in blocks (read1 where it exists: a pipe's lines come as they arrive)."""
    read = getattr(f, "read1", f.read)
    pending: list[bytes] = []
    while block := read(1 << 20):
        *complete, tail = block.split(b"\n")
        if complete:
            yield b"".join([*pending, complete[0]])
            yield from complete[1:]
            pending = []
        pending.append(tail)
    if rest := b"".join(pending):
        yield rest


def _read_table(f, name, delimiter, field, id_field, errors, start, stop, option, skip_empty):
    """Rows START to STOP of a .csv/.tsv file whose first row names its columns."""
    text = io.TextIOWrapper(f, encoding="utf-8", errors=errors, newline="")
    rows = csv.reader(text, delimiter=delimiter)
    try:
        header = next(rows, [])
        for column, choose in ((field, option), (id_field, "--id-column")):
            if column and column not in header:
                names = ", ".join(header) or "none"
                raise BadInput(f"{name}: no column {column!r} in its header row (columns: {names}); choose it with "
                               f"{choose}")  # fmt: skip
        at, id_at = header.index(field), header.index(id_field) if id_field else None
        for n, row in enumerate(rows, 1):
            if n <= start:
                continue
            if stop is not None and n > stop:
                return
            where = f"{name}: row {n}"
            if len(row) != len(header) and row:
                raise BadInput(f"{where}: {len(row)} cells, the header row has {len(header)}")
            value = _text(row[at] if row else "", where, f"column {field!r}", skip_empty)
            yield (row[id_at] if id_at is not None and value is not None else None), value
    except UnicodeDecodeError as e:
        raise BadInput(
            f"{name}: row {rows.line_num}: not valid UTF-8 ({e.reason}); fix the file or pass --errors replace"
        ) from None
    except csv.Error as e:
        raise BadInput(f"{name}: row {rows.line_num}: not a valid {delimiter!r}-separated table ({e})") from None
    finally:
        text.detach()  # F is the caller's to close


def _read_parquet(f, name, field, id_field, start, stop, option, skip_empty):
    pa, pq = _pyarrow()
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    for column, kind, check in ((field, "text", _is_text), (id_field, "id", _is_id)):
        if not column:
            continue
        choose = option if kind == "text" else "--id-column"
        if column not in schema.names:
            names = ", ".join(schema.names)
            raise BadInput(f"{name}: no column {column!r} (columns: {names}); choose it with {choose}")
        if not check(pa, schema.field(column).type):
            want = "strings" if kind == "text" else "integers or strings"
            raise BadInput(
                f"{name}: column {column!r} holds {schema.field(column).type}; {kind}s must be {want} (see {choose})"
            )
    meta = pf.metadata
    stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
    groups, row, first = [], 0, 0
    for g in range(meta.num_row_groups):  # only the row groups that overlap START..STOP
        n = meta.row_group(g).num_rows
        if row < stop and row + n > start:
            first = first if groups else row
            groups.append(g)
        row += n
    row = first
    columns = list(dict.fromkeys([field, *([id_field] if id_field else [])]))
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups, columns=columns) if groups else ():
        texts = batch.column(field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
        for k in range(max(0, start - row), min(len(texts), stop - row)):
            where = f"{name}: row {row + k + 1}"
            text = _text(texts[k], where, f"column {field!r}", skip_empty)
            yield (_id(ids[k], where, f"column {id_field!r}") if id_field and text is not None else None), text
        row += len(texts)
        if row >= stop:
            return


def _is_text(pa, t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)


def _is_id(pa, t) -> bool:
    return pa.types.is_integer(t) or _is_text(pa, t)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise BadInput("reading .parquet needs pyarrow: pip install pyarrow") from None
    return pyarrow, pyarrow.parquet
