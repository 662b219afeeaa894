"""The batch path of `runner embed`: order, batching invariance, streaming parts and --resume, odd inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(run_cli("convert", "all-minilm-l6-v2").stdout.strip())


def corpus(n: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex its bumpy trail".split()
    return [" ".join(words[(i * 7 + k) % len(words)] for k in range(1 + (i * 13) % 120)) for i in range(n)]


def test_order_and_batch_invariance(minilm) -> None:
    """Length sorting inside the engine restores input order; a text alone = the same text in a mixed batch."""
    from runner import Embedder

    items = corpus(300)
    with Embedder(str(minilm)) as model:
        batched = model.encode(items)
        alone = np.stack([model.encode(t) for t in items[:40]])
        reversed_ = model.encode(items[::-1])[::-1]
    assert (np.sum(batched[:40] * alone, axis=1) >= 0.9999).all()
    assert (np.sum(batched * reversed_, axis=1) >= 0.9999).all()


def test_resume_gives_the_file_an_uninterrupted_run_gives(minilm, tmp_path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("\n".join(corpus(600)) + "\n")
    whole = tmp_path / "whole.npy"
    run_cli("embed", "-m", str(minilm), "--input", str(src), "-o", str(whole), "--chunk-size", "40", "-q")
    out = tmp_path / "resumed.npy"
    args = ["-m", "runner", "embed", "-m", str(minilm), "--input", str(src), "-o", str(out), "--chunk-size", "40"]
    proc = subprocess.Popen([sys.executable, *args], stderr=subprocess.DEVNULL, env=os.environ.copy())
    parts = Path(str(out) + ".parts")
    deadline = time.time() + 300
    while len(list(parts.glob("*.npy"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(list(parts.glob("*.npy"))) >= 3
    done = run_cli("embed", "-m", str(minilm), "--input", str(src), "-o", str(out), "--chunk-size", "40", "--resume")
    assert "from the interrupted run" in done.stderr
    assert out.read_bytes() == whole.read_bytes() and not parts.exists()


def test_resume_refuses_parts_of_another_run(minilm, tmp_path) -> None:
    out = tmp_path / "v.npy"
    parts = Path(str(out) + ".parts")
    parts.mkdir()
    (parts / "run.json").write_text('{"run": "another"}\n')
    proc = run_cli("embed", "-m", str(minilm), "hello", "-o", str(out), "--resume", check=False)
    assert proc.returncode == 1 and "another model or options" in proc.stderr


def test_empty_input_file_gives_empty_output(minilm, tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    proc = run_cli("embed", "-m", str(minilm), "--input", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "v.npy"))
    assert "holds no texts" in proc.stderr and np.load(tmp_path / "v.npy").shape == (0, 384)


def test_one_megabyte_line(minilm, tmp_path) -> None:
    (tmp_path / "big.txt").write_text("word " * 200_000 + "\nshort\n")
    proc = run_cli("embed", "-m", str(minilm), "--input", str(tmp_path / "big.txt"), "-o", str(tmp_path / "v.npy"))
    assert "truncated 1 input(s) to 256 tokens" in proc.stderr and np.load(tmp_path / "v.npy").shape == (2, 384)
    out = tmp_path / "refused.npy"
    refused = run_cli(
        "embed", "-m", str(minilm), "--input", str(tmp_path / "big.txt"), "--no-truncate", "-o", str(out), check=False
    )
    assert (
        refused.returncode == 1 and refused.stderr.startswith("error: input 1: ") and "tokens, over" in refused.stderr
    )
    assert not out.exists() and not Path(str(out) + ".parts").exists()  # nothing left for a later run to trust


def test_invalid_utf8_names_the_line(minilm, tmp_path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\nbroken \xff\xfe here\n")
    proc = run_cli("embed", "-m", str(minilm), "--input", str(tmp_path / "bad.txt"), check=False)
    assert proc.returncode == 1 and f"{tmp_path / 'bad.txt'}:3: not valid UTF-8" in proc.stderr
    ok = run_cli("embed", "-m", str(minilm), "--input", str(tmp_path / "bad.txt"), "--errors", "replace", "-q")
    assert len(ok.stdout.splitlines()) == 3


def test_float16_and_parquet_outputs(minilm, tmp_path) -> None:
    run_cli("embed", "-m", str(minilm), "a", "b", "-o", str(tmp_path / "v.npy"), "--dtype", "float16")
    assert np.load(tmp_path / "v.npy").dtype == np.float16
    pq = pytest.importorskip("pyarrow.parquet")
    run_cli("embed", "-m", str(minilm), "a", "b", "c", "-o", str(tmp_path / "v.parquet"))
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.column("id").to_pylist() == [0, 1, 2] and len(table.column("embedding")[0]) == 384


def test_stdin_input(minilm) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "embed", "-m", str(minilm), "--input", "-", "-q"],
        input="one\ntwo\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(proc.stdout.splitlines()) == 2 and proc.stderr == ""
