"""Typed errors shared by the conversion stage and the runner.

Each carries a one-line message that names the input and says how to fix it; the CLI prints
that line and exits non-zero (tracebacks only with --debug).
"""


class UserError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


class ModelNotFound(UserError):
    pass


class UnsupportedArchitecture(UserError):
    pass


class CorruptModelFile(UserError):
    pass


class BadInput(UserError):
    pass


class EngineError(UserError):
    pass


class DiskFull(UserError):
    """No room to write an output: the message names the path, the bytes it needs and what is kept."""


class NotEnoughDisk(UserError):
    """The filesystem a run writes to cannot hold what it would write: refused before the first byte."""


class OutOfMemory(EngineError):
    """llama.cpp could not allocate a model or context: the one failure worth retrying with fewer GPU layers."""


class UnsteadyTiming(UserError):
    """Repeated timings disagreed by more than their bound (the machine was busy): nothing was cached."""
