"""How llama.cpp's CPU threads wait for each other, set before its library loads (OpenMP reads it only then).

The engine scripts/install builds runs its CPU threads on GCC's OpenMP (libgomp), and every op of a graph ends in
an OpenMP barrier. With nothing set, libgomp spins 300,000 times at a barrier before a thread sleeps: on a CPU
that another process also uses, the threads that arrived spin while the one they wait for has no core, and two
engine threads ran 3-20x slower than one. A short spin keeps an idle CPU's quick hand-offs and gives the core up
soon when a partner is late: `python -m bench.threads_under_load` (docs/benchmarks.md, "Threads that wait").
"""

from __future__ import annotations

import os

SPIN_COUNT = "1000"  # spins before a waiting thread sleeps: tens of microseconds
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_wait_default() -> None:
    """GOMP_SPINCOUNT=SPIN_COUNT, unless the user has said how OpenMP threads wait."""
    if not any(k in os.environ for k in WAIT_SETTINGS):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
