"""Outputs, locks and resumed parts are never trusted blindly (issue 20, items 4 and 7).

`-o` and its lock are opened without following links: a lock that is a link is refused, an output that is a
link to a file is refused (renaming into place would replace the link), and a stream (a character device or a
FIFO, or a link to one: /dev/stdout) takes JSON lines written through, as `> /dev/stdout` does, while npy and
parquet, written whole and renamed into place, are refused there. A part an interrupted run left is checked
(shape, dtype, size) before `--resume` trusts it; a damaged one is embedded again. Every test failed on the
tree before the fix, except the one marked as a guard.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_errors import assert_one_line_error

MODEL = "all-minilm-l6-v2"  # real weights, offline, fast: 384 dimensions


def texts(n: int) -> list[str]:
    return [f"text number {i}: the quick brown fox {i % 7} jumps over {i % 13} lazy dogs" for i in range(n)]


# --- 20.4 locks and outputs never followed through a link ----------------------------------------------------
def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path) -> None:
    """Before: the lock was opened through the link and the PID write truncated its target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out.npy"
    Path(f"{out}.lock").symlink_to(victim)
    proc = run_cli("embed", "-m", MODEL, "hi", "-o", str(out), check=False)
    assert_one_line_error(proc, f"{out}.lock", "a link")
    assert victim.read_text() == "precious\n" and not out.exists()


def test_an_output_linked_to_a_stream_is_written_through(tmp_path) -> None:
    """Before: the link was replaced by a regular file and nothing was printed."""
    link = tmp_path / "to-stdout"
    link.symlink_to("/proc/self/fd/1")  # the runner's stdout: the pipe run_cli reads
    proc = run_cli("embed", "-m", MODEL, *texts(3), "-o", str(link), "-q")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and len(rows[0]["embedding"]) == 384
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["to-stdout"]


def test_npy_into_a_stream_is_refused(tmp_path) -> None:
    link = tmp_path / "to-stdout.npy"
    link.symlink_to("/proc/self/fd/1")
    proc = run_cli("embed", "-m", MODEL, "hi", "-o", str(link), check=False)
    assert_one_line_error(proc, str(link), "a stream", "--format jsonl")
    assert proc.stdout == "" and link.is_symlink()


def test_an_output_that_is_a_link_to_a_file_is_refused(tmp_path) -> None:
    """Before: the rename replaced the link with a regular file, leaving the file it pointed to as it was."""
    target = tmp_path / "target.npy"
    np.save(target, np.zeros((1, 384), np.float32))
    before = target.read_bytes()
    link = tmp_path / "out.npy"
    link.symlink_to(target)
    proc = run_cli("embed", "-m", MODEL, "hi", "-o", str(link), check=False)
    assert_one_line_error(proc, str(link), f"a link to {target}", "-o the file it points to")
    assert link.is_symlink() and target.read_bytes() == before


# --- 20.7 --resume checks each part before trusting it ------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """An input of 9 texts, the vectors an uninterrupted run gives it (chunks of 3), and the two parts a run
    stopped by a bad line 7 left."""
    tmp = tmp_path_factory.mktemp("resume")
    good = tmp / "good.txt"
    good.write_text("\n".join(texts(9)) + "\n")
    whole = tmp / "whole.npy"
    run_cli("embed", "-m", MODEL, "--input", str(good), "--chunk-size", "3", "-o", str(whole), "-q")
    bad = tmp / "bad.txt"
    lines = good.read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join(lines[:6] + [b"\xff\xfe not UTF-8\n"] + lines[7:]))
    out = tmp / "parts-left" / "v.npy"
    out.parent.mkdir()
    proc = run_cli("embed", "-m", MODEL, "--input", str(bad), "--chunk-size", "3", "-o", str(out), check=False)
    assert proc.returncode == 1 and len(list(Path(f"{out}.parts").glob("*.npy"))) == 2, proc.stderr
    return good, out, np.load(whole)


@pytest.mark.parametrize("damage", ["another shape and dtype", "cut short", "cut inside its header"])
def test_resume_embeds_a_damaged_part_again(interrupted, tmp_path, damage) -> None:
    """Before: a (3, 7) float64 part under the right name was mixed into the output, and a cut one crashed
    the run with an mmap error."""
    good, left, whole = interrupted
    out = tmp_path / "v.npy"
    parts = Path(f"{out}.parts")
    shutil.copytree(f"{left}.parts", parts)
    first = sorted(parts.glob("000000-*.npy"))[0]
    if damage == "another shape and dtype":
        np.save(first, np.ones((3, 7), np.float64))
    else:
        data = first.read_bytes()
        first.write_bytes(data[: len(data) // 2] if damage == "cut short" else data[:100])
    args = ["--input", str(good), "--chunk-size", "3", "-o", str(out), "--resume"]
    proc = run_cli("embed", "-m", MODEL, *args)
    assert f"warning: {first}: damaged (" in proc.stderr and "embedding its 3 texts again" in proc.stderr
    assert "(3 from the interrupted run)" in proc.stderr, proc.stderr  # the whole second part was kept
    got = np.load(out)
    assert got.shape == whole.shape and np.allclose(got, whole, atol=1e-6)


def test_a_part_is_checked_against_the_run_before_it_is_counted(tmp_path, caplog) -> None:
    """Guard, without a model: the right rows, width and dtype pass; anything else is embedded again."""
    from runner.io import VectorSink

    out = str(tmp_path / "v.npy")
    sink = VectorSink(out, "npy", "float16", "key", False, dims=4)
    sink.write(0, "a" * 64, np.ones((3, 4), np.float32), 0)
    sink.write(1, "b" * 64, np.ones((2, 4), np.float32), 3)
    (two,) = Path(f"{out}.parts").glob("000001-2-*.npy")  # its name says 3 texts, its data holds 2 vectors
    two.rename(two.with_name(two.name.replace("-2-", "-3-")))
    resumed = VectorSink(out, "npy", "float16", "key", True, dims=4)
    assert resumed.saved() == 5
    with caplog.at_level(logging.WARNING, logger="runner"):
        assert resumed.done(0, "a" * 64, 3)
        assert not resumed.done(1, "b" * 64, 3)  # 2 vectors where the run has 3 texts
    assert "2 vectors, not the 3 of its texts" in caplog.text and resumed.saved() == 3
    wider = VectorSink(out, "npy", "float16", "key", True, dims=8)  # the same names, another width
    assert not wider.done(0, "a" * 64, 3) and wider.saved() == 0
