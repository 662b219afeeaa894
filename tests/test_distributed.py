"""Ray Data scale-out on a local cluster: same vectors as `runner embed`, every row exactly once, resumable."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(run_cli("convert", "all-minilm-l6-v2").stdout.strip())


def corpus(n: int) -> list[str]:
    words = "embedding models map text to vectors so that similar meanings land close together".split()
    return [" ".join(words[(i * 5 + k) % len(words)] for k in range(3 + (i * 7) % 40)) + f" #{i}" for i in range(n)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, minilm):
    """1,200 jsonl rows (with a blank line) and 900 txt lines; the reference from single-process `runner embed`."""
    root = tmp_path_factory.mktemp("ray-inputs")
    texts = corpus(2100)
    lines = [json.dumps({"text": t, "key": f"k{i}"}) for i, t in enumerate(texts[:1200])]
    (root / "a.jsonl").write_text("\n".join(lines[:600] + [""] + lines[600:]) + "\n")
    (root / "b.txt").write_text("\n".join(texts[1200:]) + "\n")
    (root / "all.txt").write_text("\n".join(texts) + "\n")
    run_cli("embed", "-m", str(minilm), "--input", str(root / "all.txt"), "-o", str(root / "ref.npy"), "-q")
    return root, texts, np.load(root / "ref.npy")


def read_shards(out: Path) -> tuple[list, np.ndarray]:
    tables = [pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    vectors = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    return ids, vectors


def test_two_workers_match_single_process_and_resume(cluster, minilm, inputs, tmp_path) -> None:
    from runner.distributed import embed_dataset

    root, texts, ref = inputs
    out = tmp_path / "out"
    files = [str(root / "a.jsonl"), str(root / "b.txt")]
    s = embed_dataset(files, str(out), str(minilm), workers=2, shard_rows=400)
    assert s.rows == 2100 and s.shards == 7 and s.skipped_shards == 0  # 1201 lines: 4 shards; 900: 3
    ids, vectors = read_shards(out)
    # ids: the row's line number across the inputs; the blank line (600) is not a row.
    assert ids == list(range(600)) + list(range(601, 1201)) + list(range(1201, 2101))
    assert (np.sum(vectors * ref, axis=1) >= 0.99999).all()
    # A rerun after a partial job writes only the missing shards.
    kept = {p: p.stat().st_mtime_ns for p in sorted(out.glob("part-*.parquet"))[1:]}
    sorted(out.glob("part-*.parquet"))[0].unlink()
    again = embed_dataset(files, str(out), str(minilm), workers=2, shard_rows=400)
    assert again.skipped_shards == s.shards - 1 and again.rows == 400
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert read_shards(out)[0] == ids


def test_id_column_and_killed_worker(cluster, minilm, inputs, tmp_path) -> None:
    """Kill one actor mid-job: Ray restarts it and its shard is done again; every row lands exactly once."""
    import psutil

    from runner.distributed import embed_dataset

    root, texts, ref = inputs
    out = tmp_path / "out"
    result = {}

    def job() -> None:
        result["summary"] = embed_dataset([str(root / "a.jsonl")], str(out), str(minilm), workers=2, shard_rows=100,
                                          id_column="key")  # fmt: skip

    thread = threading.Thread(target=job)
    thread.start()
    killed = None
    deadline = time.time() + 240
    while killed is None and thread.is_alive() and time.time() < deadline:
        if list(out.glob("part-*.parquet")):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if "ShardWriter" in " ".join(proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed = proc.info["pid"]
                    break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert not thread.is_alive()
    if killed is None:
        pytest.skip("the job finished before a worker could be killed")
    ids, vectors = read_shards(out)
    assert sorted(ids, key=lambda k: int(k[1:])) == [f"k{i}" for i in range(1200)] and len(set(ids)) == 1200
    assert (np.sum(vectors * ref[[int(k[1:]) for k in ids]], axis=1) >= 0.99999).all()
    assert not list(out.glob("*.partial-*"))


def test_bad_inputs_are_one_line(tmp_path) -> None:
    proc = run_cli("embed-dataset", str(tmp_path / "none-*.txt"), str(tmp_path / "o"), "-m", "x", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no such input" in proc.stderr
