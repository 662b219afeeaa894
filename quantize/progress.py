"""How a long step reports: a bar while it runs, one summary line when it ends, or nothing at all.

On an 8B model the hub download, the conversion and each quantization take minutes. The CLI draws a tqdm
bar on stderr only when stderr is a terminal and not `-q` (a pipe or a log file gets no carriage-return
noise), and prints one summary line per step unless `-q`. Library callers get silence unless they ask.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

GIB = 2**30
MIB = 2**20


def _nothing(_: str) -> None:
    pass


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Progress:
    """SAY gets one summary line per finished step; BARS draws a bar on stderr while a step runs."""

    say: Callable[[str], None] = _nothing
    bars: bool = False

    @staticmethod
    def stderr(quiet: bool = False) -> Progress:
        """The CLI's: summary lines on stderr unless QUIET, bars only on a terminal."""
        return Progress(_nothing if quiet else _to_stderr, not quiet and sys.stderr.isatty())

    def bar(self, desc: str, total: int, unit: str = "B") -> tqdm:
        """A bar over TOTAL bytes (or UNITs) that clears itself when done: the summary line replaces it."""
        scale = unit == "B"
        return tqdm(
            total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
            file=sys.stderr, disable=not self.bars, leave=False, dynamic_ncols=True,
        )  # fmt: skip


SILENT = Progress()


def size(n: int) -> str:
    """Bytes for people: GiB above 1 GiB, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def rate(n: int, seconds: float) -> str:
    return f"{n / MIB / max(seconds, 1e-9):.0f} MiB/s"
