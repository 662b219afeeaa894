"""The default thread count follows the CPU's load: the usable cores less those other processes keep busy
(planner.hardware.threads_for_load), set between micro-batches; an explicit --threads never changes. The speed
it buys is measured by `python -m bench.threads_under_load`, not here."""

from __future__ import annotations

import time

import numpy as np
import pytest

from planner import hardware
from planner.hardware import CpuTimes, others_busy_cores, threads_for_load
from runner import engine as engine_module
from runner.engine import Engine


@pytest.mark.parametrize(
    "most,others,threads",
    [(2, 0.0, 2), (2, 0.3, 2), (2, 0.49, 2), (2, 0.5, 1), (2, 0.67, 1), (2, 1.0, 1), (2, 5.0, 1), (1, 0.9, 1),
     (16, 0.2, 16), (16, 4.2, 12), (16, 7.6, 8), (16, 40.0, 1)],
)  # fmt: skip
def test_threads_for_load(most: int, others: float, threads: int) -> None:
    assert threads_for_load(most, others) == threads


def test_others_busy_cores_leaves_out_this_process(monkeypatch) -> None:
    monkeypatch.setattr(hardware, "usable_cpus", lambda: [0, 1])
    before = CpuTimes(wall=10.0, busy=100.0, own=5.0)
    # 2 s: the CPUs were busy 3.2 CPU-seconds, 1.8 of them this process's own threads.
    after = CpuTimes(wall=12.0, busy=103.2, own=6.8)
    assert others_busy_cores(before, after, cores=2) == pytest.approx(0.7)
    assert others_busy_cores(after, after, cores=2) == 0.0  # no time passed: nothing to say
    # Two hyperthreads per core: a busy logical CPU is half a core.
    monkeypatch.setattr(hardware, "usable_cpus", lambda: [0, 1, 2, 3])
    assert others_busy_cores(before, CpuTimes(12.0, 102.0, 5.0), cores=2) == pytest.approx(0.5)
    # Counters of a process that ended can make busy - own negative over a window: never below none.
    assert others_busy_cores(before, CpuTimes(12.0, 100.0, 7.0), cores=2) == 0.0


class FakeLoad:
    """cpu_times as a machine where other processes keep `others` cores busy."""

    def __init__(self) -> None:
        self.others = 0.0
        self.last = CpuTimes(time.monotonic(), 0.0, 0.0)

    def __call__(self) -> CpuTimes:
        now = time.monotonic()
        self.last = CpuTimes(now, self.last.busy + self.others * (now - self.last.wall), 0.0)
        return self.last


@pytest.fixture
def two_cores(monkeypatch) -> FakeLoad:
    if (__import__("os").cpu_count() or 1) < 2:
        pytest.skip("needs 2 logical CPUs for a 2-thread engine")
    load = FakeLoad()
    monkeypatch.setattr(engine_module, "usable_cores", lambda: 2)
    monkeypatch.setattr(engine_module, "cpu_times", load)
    monkeypatch.setattr(engine_module, "FIRST_LOAD_WINDOW_S", 0.0)
    monkeypatch.setattr(engine_module, "LOAD_WINDOW_S", 0.0)
    return load


def test_default_threads_follow_the_load_and_the_vectors_do_not(tiny, two_cores) -> None:
    path = tiny("nemotron").gguf("f16")
    texts = ["a first text about rivers", "a second, somewhat longer text about mountains and snow"]
    with Engine(path) as engine:
        seqs = [engine.tokenize(t) for t in texts]
        assert engine.follows_load and engine.n_threads == 2
        quiet = engine.embed_tokens(seqs)
        assert engine.n_threads == 2
        two_cores.others = 1.0  # another process takes a core
        time.sleep(0.01)
        busy = engine.embed_tokens(seqs)
        assert engine.n_threads == 1
        two_cores.others = 0.2  # it ends; a light one stays
        time.sleep(0.01)
        engine.embed_tokens(seqs)
        assert engine.n_threads == 2
    # The thread count splits each matmul's rows among threads; no row's sum changes with it.
    np.testing.assert_array_equal(quiet, busy)
    with Engine(path, n_threads=1) as one:
        np.testing.assert_array_equal(one.embed_tokens(seqs), quiet)


def test_explicit_threads_never_change(tiny, two_cores) -> None:
    two_cores.others = 1.0
    with Engine(tiny("nemotron").gguf("f16"), n_threads=2) as engine:
        seqs = [engine.tokenize("a text")]
        for _ in range(3):
            time.sleep(0.01)
            engine.embed_tokens(seqs)
        assert not engine.follows_load and engine.n_threads == 2
