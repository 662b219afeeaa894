"""`runner embed-dataset`'s output folder is trusted only as far as it proves itself, without Ray or a model.

A folder records what made it (`_run.json`: model sha256, options, inputs) and a rerun made otherwise is refused
naming the option; a part counts as complete only when it opens, names this run and shard and carries the digest
of the shard's input rows; one job at a time holds the folder (a kernel lock), and only then are temp files of
dead writers removed; bad rows stop the job on the driver, before Ray starts, in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from quantize.errors import BadInput, CorruptModelFile, EngineError
from runner.distributed import (
    RUN_FILE,
    RayEmbedder,
    check_inputs,
    embed_dataset,
    part_complete,
    plan_shards,
    prepare_output,
    run_record,
    shard_path,
    worker_error,
    write_part,
)
from runner.io import OutputLock
from runner.model import Prompts, ResolvedModel
from tests.conftest import run_cli

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

OPTIONS = dict(column="text", id_column=None, shard_rows=4, errors="strict", query=False, task=None, max_length=None)


@pytest.fixture
def job(tmp_path: Path):
    """Ten texts in a.txt, a stand-in model file (only its sha256 is read here) and the folder's run record."""
    (tmp_path / "a.txt").write_text("".join(f"text {i}\n" for i in range(10)))
    model = tmp_path / "m-Q8_0.gguf"
    model.write_bytes(b"weights one")
    files = [str(tmp_path / "a.txt")]
    return tmp_path, files, model, run_record(files, stand_in(model), **OPTIONS)


def stand_in(path: Path) -> ResolvedModel:
    """PATH as the model a run resolved (only its sha256 is read here)."""
    return ResolvedModel(path, Prompts.plain(), None, None, "m", "Q8_0", "mean")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"shard_rows": 5}, "another --shard-rows (4, now 5)"),
        ({"column": "body"}, "another --column"),
        ({"max_length": 64}, "another --max-length (null, now 64)"),
        ({"query": True}, "another --query/--document"),
        ({"model": b"weights two"}, "another model file (-m/--quant) (m-Q8_0.gguf "),
        ({"inputs": "b.txt"}, "another INPUTS (1 files from "),
    ],
)
def test_a_rerun_made_otherwise_is_refused_naming_the_option(job, change, says) -> None:
    """Before: any file named part-NNNNN.parquet counted as done, whatever model, options or texts made it."""
    root, files, model, record = job
    out = root / "out"
    prepare_output(out, record, overwrite=False)
    assert json.loads((out / RUN_FILE).read_text()) == record
    prepare_output(out, record, overwrite=False)  # the same run goes on
    options = dict(OPTIONS)
    if "model" in change:
        model.write_bytes(change.pop("model"))
    if "inputs" in change:
        (root / change["inputs"]).write_text("x\n")
        files = [str(root / change.pop("inputs"))]
    options.update(change)
    with pytest.raises(BadInput) as e:
        prepare_output(out, run_record(files, stand_in(model), **options), overwrite=False)
    assert says in str(e.value) and str(e.value).endswith("choose a new output folder or pass --overwrite")


def test_overwrite_removes_only_this_tools_files(job) -> None:
    root, files, model, record = job
    out = root / "out"
    out.mkdir()
    mine = [
        out / "part-00000.parquet",
        out / "part-00001.parquet",
        out / RUN_FILE,
        out / ".part-00001.parquet.partial-h-1-ab",
    ]
    theirs = [out / "notes.txt", out / "part-1.parquet", out / "part-00000.parquet.bak"]
    for p in mine + theirs:
        p.write_text("{}")
    with pytest.raises(BadInput, match="made by a run with another"):
        prepare_output(out, record, overwrite=False)
    prepare_output(out, record, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([RUN_FILE] + [p.name for p in theirs])
    assert json.loads((out / RUN_FILE).read_text()) == record


def test_parts_with_no_run_record_are_refused(job) -> None:
    root, files, model, record = job
    out = root / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(BadInput, match=f"holds part files but no {RUN_FILE}"):
        prepare_output(out, record, overwrite=False)


def test_a_part_counts_only_when_it_verifies(job) -> None:
    """Before: garbage, a half-truncated part, or a part of other texts or another run counted as complete."""
    root, files, model, record = job
    out = root / "out"
    out.mkdir()
    shards = check_inputs(plan_shards(files, 4), "text", None, "strict", progress=False)
    shard, other = shards[0], shards[1]
    path = Path(shard_path(str(out), shard.index))
    assert not part_complete(path, shard, "run-1")  # missing
    vectors = np.ones((4, 8), np.float32)
    write_part(str(out), shard, "run-1", [0, 1, 2, 3], vectors, [False] * 4)
    assert part_complete(path, shard, "run-1")
    assert pq.read_table(path).column("id").to_pylist() == [0, 1, 2, 3]
    assert not part_complete(path, shard, "run-2")  # another run's
    assert not part_complete(path, other, "run-1")  # another shard's
    changed = check_inputs(plan_shards([_rewrite(root / "a.txt", 2, "edited")], 4), "text", None, "strict", False)
    assert changed[0].digest != shard.digest and not part_complete(path, changed[0], "run-1")  # other input rows
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # cut short by a crash of some other writer
    assert not part_complete(path, shard, "run-1")
    path.write_bytes(b"not parquet at all")
    assert not part_complete(path, shard, "run-1")
    pq.write_table(pa.table({"id": [0, 1, 2, 3]}), path)  # a parquet file with no shard metadata
    assert not part_complete(path, shard, "run-1")
    assert not list(out.glob(".part-*"))  # write_part leaves no temp file


def _rewrite(path: Path, line: int, text: str) -> str:
    lines = path.read_text().splitlines()
    lines[line] = text
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_one_job_per_folder_and_temp_files_removed_only_under_its_lock(job) -> None:
    """Before: no lock, and every part-*.parquet.partial-* was deleted at start, a live writer's too."""
    root, files, model, record = job
    out = root / "out"
    out.mkdir()
    temp = out / ".part-00000.parquet.partial-otherhost-12345-00ff"
    temp.write_bytes(b"half a part")
    with OutputLock(out / RUN_FILE, option="OUTPUT_DIR"):  # a job that is running
        with pytest.raises(
            BadInput, match=rf"{RUN_FILE}: another run \(PID {os.getpid()}\) is writing it; .* OUTPUT_DIR"
        ):
            embed_dataset(files, str(out), str(model), shard_rows=4)
        assert temp.exists()
    prepare_output(out, record, overwrite=False)
    assert not temp.exists()


@pytest.mark.parametrize(
    ("content", "extra", "says"),
    [
        (b"one\n\nthree\n", {}, "a.txt:2: blank line"),
        (b"one\ntw\xffo\n", {}, "a.txt:2: not valid UTF-8"),
        (b'{"text": "a", "id": 1}\n{"text": "b", "id": "2"}\n', {"id_column": "id"}, "a.jsonl:2: id '2' is a string"),
        (b'{"body": "a"}\n', {}, "a.jsonl:1: no field 'text'; choose the field with --column"),
        (b'{"text": null}\n', {}, "a.jsonl:1: field 'text' is null"),
    ],
)
def test_bad_rows_stop_the_job_before_ray_or_the_model(tmp_path, content, extra, says) -> None:
    """Before: blank lines were skipped, bad bytes replaced, nulls embedded as "None", and a missing column or
    mixed ids failed inside a Ray worker with a 5 KB traceback (exit 2)."""
    name = "a.txt" if b"{" not in content else "a.jsonl"
    (tmp_path / name).write_bytes(content)
    ray = pytest.importorskip("ray")
    with pytest.raises(BadInput, match=says):
        embed_dataset([str(tmp_path / name)], str(tmp_path / "out"), "no-such-model", **extra)
    assert not ray.is_initialized() and not (tmp_path / "out" / RUN_FILE).exists()


def test_bad_rows_are_one_line_from_the_cli(tmp_path) -> None:
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "a.parquet")
    proc = run_cli("embed-dataset", str(tmp_path / "a.parquet"), str(tmp_path / "out"), "-m", "x", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert (
        proc.stderr
        == f"error: {tmp_path / 'a.parquet'}: row 2: column 'text' is null, not a string; fill it or drop it\n"
    )


def test_an_output_dir_that_is_a_file_is_one_line(job) -> None:
    root, files, model, record = job
    with pytest.raises(BadInput, match="not a folder; OUTPUT_DIR is the folder the parts go to"):
        embed_dataset(files, str(root / "a.txt"), str(model))


def test_ray_embedder_refuses_cells_that_are_no_text() -> None:
    """`ds.map_batches(RayEmbedder, ...)` in a user's own pipeline: before, None and 5 were embedded as "None", "5"."""
    embedder = object.__new__(RayEmbedder)  # the check runs before the model is used: no model needed
    embedder.column = "text"
    for cell, says in ((None, "NoneType None"), (5, "int 5"), (" ", "blank")):
        with pytest.raises(BadInput, match=f"column 'text', row 2 of the batch: {says}, not a text"):
            embedder({"text": np.array(["fine", cell], dtype=object)})


# What Ray Data 2.x hands the driver when a worker raises: only the traceback text, with ANSI colours.
RAY_TEXT = (
    "\x1b[36mray::MapWorker(MapBatches(ShardWriter)).submit()\x1b[39m (pid=1, ip=10.0.0.1)\n"
    '  File "/x/runner/inputs.py", line 9, in _read_lines\n'
    '    raise BadInput(f"{where}: blank line")\n'
    "quantize.errors.BadInput: a.jsonl:3: blank line; every line is one text: remove it\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::MapWorker(MapBatches(ShardWriter)).submit()\x1b[39m (pid=1, ip=10.0.0.1)\n"
    "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
)


def test_a_worker_failure_is_one_line_naming_the_cause() -> None:
    ray = pytest.importorskip("ray")
    e = worker_error(Exception(RAY_TEXT))
    assert type(e) is BadInput and str(e) == "a.jsonl:3: blank line; every line is one text: remove it"
    wrapped = ray.exceptions.RayTaskError("submit", RAY_TEXT, CorruptModelFile("m.gguf: not a GGUF file"))
    assert str(worker_error(wrapped)) == "m.gguf: not a GGUF file"
    other = worker_error(Exception(RAY_TEXT.replace("quantize.errors.BadInput", "MemoryError")))
    assert type(other) is EngineError and str(other).startswith("a worker failed: MemoryError: a.jsonl:3")
    assert "\x1b" not in str(worker_error(Exception("\x1b[31mboom\x1b[0m")))
