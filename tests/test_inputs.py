"""One input reader: `runner embed --input` and `runner embed-dataset` read a file the same way.

The same file gives the same texts in the same order, whether read whole or shard by shard from byte offsets
and row groups; a blank line, bytes that are not UTF-8, a null or non-string cell is an error naming the file
and the line or row in both, never skipped and never the string "None". No model and no Ray here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize.errors import BadInput
from runner.distributed import check_inputs, plan_shards, read_shard
from runner.inputs import count_texts, read_records, read_texts

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [f"text number {i}, {'long ' * (i % 7)}ünïcode" for i in range(25)]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """TEXTS as .txt, .jsonl (strings and objects with an id) and .parquet in row groups of 7."""
    made = {"txt": tmp_path / "a.txt", "jsonl": tmp_path / "a.jsonl", "parquet": tmp_path / "a.parquet"}
    made["txt"].write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    lines = [json.dumps(t) if i % 3 == 0 else json.dumps({"text": t, "id": f"k{i}"}) for i, t in enumerate(TEXTS)]
    made["jsonl"].write_text("\n".join(lines), encoding="utf-8")  # no newline at the end
    pq.write_table(pa.table({"text": TEXTS, "id": [f"k{i}" for i in range(25)]}), made["parquet"], row_group_size=7)
    return made


def dataset_texts(path: Path, shard_rows: int, errors: str = "strict") -> list[str]:
    """What embed-dataset's workers read: every shard on its own, seeking by byte offset or row group."""
    return [t for s in plan_shards([str(path)], shard_rows) for t in read_shard(s, "text", None, errors)[1]]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_same_texts_whole_or_by_shard(files, kind) -> None:
    path = files[kind]
    assert list(read_texts(str(path))) == TEXTS
    assert count_texts(str(path)) == 25
    for shard_rows in (1, 4, 7, 25, 100):
        assert dataset_texts(path, shard_rows) == TEXTS


def test_ids_are_the_id_column_else_row_numbers(files) -> None:
    shards = plan_shards([str(files["parquet"]), str(files["txt"])], 4)
    ids = [i for s in shards for i in read_shard(s, "text", "id" if s.file.endswith(".parquet") else None)[0]]
    assert ids == [f"k{i}" for i in range(25)] + list(range(25, 50))


BAD_LINES = {
    # name: (file content, line or row it names, what the message says)
    "blank line": (b"one\n\nthree\n", "a.txt:2", "blank line"),
    "whitespace line": (b"one\n \t\nthree\n", "a.txt:2", "blank line"),
    "bad bytes": (b"one\ntw\xffo\n", "a.txt:2", "not valid UTF-8"),
    "blank jsonl line": (b'"one"\n\n"three"\n', "a.jsonl:2", "blank line"),
    "null field": (b'"one"\n{"text": null}\n', "a.jsonl:2", "field 'text' is null"),
    "number field": (b'"one"\n{"text": 5}\n', "a.jsonl:2", "field 'text' is a number"),
    "empty field": (b'{"text": ""}\n', "a.jsonl:1", "field 'text' is blank"),
    "bare number": (b'"one"\n6\n', "a.jsonl:2", "a number, not a string"),
    "huge integer": (b"1" * 5000 + b"\n", "a.jsonl:1", "not valid JSON"),
    "deep nesting": (b"[" * 100_000 + b"\n", "a.jsonl:1", "not valid JSON"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_line_is_the_same_error_for_embed_and_embed_dataset(tmp_path, case) -> None:
    """Before: embed-dataset skipped blank lines, replaced bad bytes and embedded nulls as "None"."""
    content, where, says = BAD_LINES[case]
    path = tmp_path / where.split(":")[0]
    path.write_bytes(content)
    with pytest.raises(BadInput) as whole:
        list(read_texts(str(path)))
    with pytest.raises(BadInput) as sharded:
        dataset_texts(path, 1)
    assert str(whole.value) == str(sharded.value)
    assert str(whole.value).startswith(f"{path.parent / where}: ") and says in str(whole.value)


def test_replace_is_the_same_for_both(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\ntw\xffo\n")
    assert list(read_texts(str(path), errors="replace")) == dataset_texts(path, 1, "replace") == ["one", "tw\ufffdo"]


@pytest.mark.parametrize(
    ("column", "says"),
    [
        (["a", None, "c"], "a.parquet: row 2: column 'text' is null, not a string"),
        (["a", "b", " "], "a.parquet: row 3: column 'text' is blank"),
        ([5, 6, 7], "a.parquet: column 'text' holds int64; texts must be strings"),
    ],
)
def test_null_or_non_string_cells_are_errors_naming_the_row(tmp_path, column, says) -> None:
    """Before: embed-dataset embedded them as the strings "None", "5", "6"."""
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": column}), path)
    for read in (lambda: list(read_texts(str(path))), lambda: dataset_texts(path, 2)):
        with pytest.raises(BadInput, match=says.replace("(", r"\(")) as e:
            read()
        assert str(e.value).startswith(str(path.parent))


def test_parquet_through_runner_embed_reader(files) -> None:
    """Before: `runner embed --input x.parquet` read the file's bytes as lines of text."""
    assert list(read_texts(str(files["parquet"]))) == TEXTS


def test_missing_columns_and_bad_ids(tmp_path, files) -> None:
    with pytest.raises(BadInput, match=r"no column 'body' \(columns: text, id\); choose it with --column"):
        list(read_records(str(files["parquet"]), "body", option="--column"))
    with pytest.raises(BadInput, match="no field 'body'; choose the field with --field"):
        list(read_texts(str(files["jsonl"]), "body"))
    with pytest.raises(BadInput, match=r"a.jsonl:1: a string, not an object with field 'id'"):
        list(read_records(str(files["jsonl"]), "text", "id"))
    path = tmp_path / "ids.jsonl"
    for id_value, says in (("true", "a boolean"), ("null", "null"), ("1.5", "a number"), ("[1]", "an array")):
        path.write_text(f'{{"text": "a", "id": 1}}\n{{"text": "b", "id": {id_value}}}\n')
        with pytest.raises(BadInput, match=f"ids.jsonl:2: field 'id' is {says}"):
            list(read_records(str(path), "text", "id"))


def test_mixed_id_types_are_found_before_any_worker(tmp_path) -> None:
    """Before: the parquet writer failed inside a Ray worker (or parts of one job held ids of two types)."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    a.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": 2}\n')
    pq.write_table(pa.table({"text": ["c", "d"], "id": ["x", "y"]}), b)
    shards = plan_shards([str(a), str(b)], 1)
    with pytest.raises(BadInput, match=r"b.parquet: row 1: id 'x' is a string, the id at .*a.jsonl:1 an integer"):
        check_inputs(shards, "text", "id", "strict", progress=False)
    assert len(check_inputs(shards[:2], "text", "id", "strict", progress=False)) == 2


def test_stdin_lines_arrive_as_they_are_written(monkeypatch) -> None:
    """`-` reads stdin with read1: the first line is a text before the pipe closes (no 1 MiB block wait)."""
    import os
    import sys

    r, w = os.pipe()
    os.write(w, b"first\n")
    with os.fdopen(r, "rb") as pipe:
        monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": pipe})())
        texts = read_texts("-")
        assert next(texts) == "first"  # would block here if the reader waited for a full block
        os.write(w, b"second")
        os.close(w)
        assert list(texts) == ["second"]
