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

from quantize.errors import BadInput, CorruptModelFile
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
    """1,200 jsonl rows and 900 txt lines; the reference from single-process `runner embed`."""
    root = tmp_path_factory.mktemp("ray-inputs")
    texts = corpus(2100)
    lines = [json.dumps({"text": t, "key": f"k{i}"}) for i, t in enumerate(texts[:1200])]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
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
    assert s.rows == 2100 and s.shards == 6 and s.skipped_shards == 0  # 1200 lines: 3 shards; 900: 3
    ids, vectors = read_shards(out)
    assert ids == list(range(2100))  # the row's line number across the inputs
    assert (np.sum(vectors * ref, axis=1) >= 0.99999).all()
    # A rerun writes only the shards whose part is missing or does not verify (cut short, garbage), with one
    # worker given both CPUs as llama.cpp threads (before: num_cpus=1, one thread).
    parts = sorted(out.glob("part-*.parquet"))
    kept = {p: p.stat().st_mtime_ns for p in parts[3:]}
    parts[0].unlink()
    parts[1].write_bytes(parts[1].read_bytes()[:-100])
    parts[2].write_bytes(b"garbage")
    again = embed_dataset(files, str(out), str(minilm), workers=1, shard_rows=400)
    assert again.skipped_shards == s.shards - 3 and again.rows == 1200 and again.threads == 2
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert read_shards(out)[0] == ids
    # Another --shard-rows would write parts over other row ranges (before: 400 duplicate ids): refused.
    with pytest.raises(BadInput, match="another --shard-rows"):
        embed_dataset(files, str(out), str(minilm), workers=2, shard_rows=300)


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
            # Only this test process's own Ray cluster: another pytest worker may run a job of its own.
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmdline = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if "ShardWriter" in cmdline:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = proc.pid
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


def test_cpus_per_worker(cluster) -> None:
    """The cluster's cores shared out (the fixture's cluster has 2); more than a node has is refused."""
    from runner.distributed import cpus_for_workers

    assert [cpus_for_workers(w, None) for w in (1, 2, 3)] == [2, 1, 1]
    assert cpus_for_workers(2, 2) == 2
    with pytest.raises(BadInput, match="--cpus-per-worker 3: no node of the Ray cluster has that many CPUs"):
        cpus_for_workers(1, 3)


class _RaisesInCall:
    def __call__(self, batch):
        raise BadInput("a.jsonl:3: blank line; every line is one text: remove it")


class _RaisesInInit:
    def __init__(self) -> None:
        raise CorruptModelFile("m.gguf: not a GGUF file")

    def __call__(self, batch):
        return batch


@pytest.mark.parametrize("udf", [_RaisesInCall, _RaisesInInit])
def test_worker_errors_come_back_as_themselves(cluster, udf) -> None:
    """What Ray Data raises on the driver (RayTaskError(UserCodeException), ActorDiedError: the worker's error
    only as traceback text with ANSI codes) becomes the worker's own one-line error."""
    from runner.distributed import worker_error

    ds = ray.data.from_items([{"a": 1}]).map_batches(udf, batch_size=1, concurrency=1, num_cpus=1)
    with pytest.raises(Exception) as raised:
        ds.materialize()
    e = worker_error(raised.value)
    assert type(e) is (BadInput if udf is _RaisesInCall else CorruptModelFile)
    assert str(e) in ("a.jsonl:3: blank line; every line is one text: remove it", "m.gguf: not a GGUF file")
