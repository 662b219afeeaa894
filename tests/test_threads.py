"""How llama.cpp's threads wait at their barriers is set before its library loads (quantize/openmp.py): a short
spin, unless the user said otherwise; and a vector does not depend on the thread count. The speed this buys is
measured by `python -m bench.threads_under_load`, not here."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from quantize.openmp import SPIN_COUNT, WAIT_SETTINGS
from runner.engine import Engine

# What libgomp itself read at load: omp_display_env prints its settings, after runner.engine loaded llama.cpp.
SHOW = """
import ctypes, ctypes.util, runner.engine
ctypes.CDLL(ctypes.util.find_library("gomp") or "libgomp.so.1").omp_display_env(1)
"""


def libgomp_settings(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    run = subprocess.run([sys.executable, "-c", SHOW], env=clean | env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr + run.stdout


def engine_uses_libgomp() -> bool:
    import llama_cpp

    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so")
    ldd = subprocess.run(["ldd", lib], capture_output=True, text=True) if os.path.exists(lib) else None
    return bool(ldd and "libgomp" in ldd.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="libgomp's settings, read on Linux")
def test_threads_spin_briefly_unless_the_user_says_otherwise() -> None:
    if not engine_uses_libgomp():
        pytest.skip("this engine build does not run its threads on GCC's OpenMP")
    assert f"GOMP_SPINCOUNT = '{SPIN_COUNT}'" in libgomp_settings({})
    assert "GOMP_SPINCOUNT = '300000'" in libgomp_settings({"GOMP_SPINCOUNT": "300000"})
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in libgomp_settings({"OMP_WAIT_POLICY": "active"})


def test_vectors_do_not_depend_on_the_thread_count(tiny) -> None:
    """Each thread takes whole rows of a matrix product; no row's sum changes with how many threads there are."""
    path = tiny("nemotron").gguf("f16")
    texts = ["a first text about rivers", "a second, somewhat longer text about mountains and snow"]
    vectors = []
    for threads in (1, 2, 3):
        with Engine(path, n_threads=min(threads, os.cpu_count() or 1)) as engine:
            vectors.append(engine.embed_tokens([engine.tokenize(t) for t in texts]))
    np.testing.assert_array_equal(vectors[0], vectors[1])
    np.testing.assert_array_equal(vectors[0], vectors[2])


def test_the_bench_runs_each_setting_in_its_own_process_and_the_default_unset() -> None:
    from bench import threads_under_load as bench

    cs = bench.contenders(2, [0, 5000])
    assert [c.threads for c in cs] == [1, 2, 2, 2, None]
    assert [c.env.get("GOMP_SPINCOUNT") for c in cs] == ["300000", "300000", "0", "5000", None]
    assert cs[-1].env == {}  # the runner's own default (quantize/openmp.py) decides
    assert [c.threads for c in bench.contenders(1, [])] == [1, None]
    args = bench.parse_args(["--loads", "0,1.5", "--spins", "0,1000"])
    assert args.loads == [0.0, 1.5] and args.spins == [0, 1000]
    for bad in (["--loads", "one"], ["--loads", "-1"], ["--spins", "x"], ["--models", "bert"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
