"""Options shared by several commands, built once. A default lives in its dataclass (planner.HardwareOptions,
runner.embed_run.EmbedOptions, runner.serve.Limits) or in the signature of the function a command calls, and the
option reads it from there (`field_option`); ranges
are the option's type (click.IntRange), so a bad value is refused while parsing, in one line naming the option."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import click

from planner import HardwareOptions
from planner.policy import PREFERENCES

F = TypeVar("F", bound=Callable[..., Any])

AT_LEAST_1 = click.IntRange(min=1)


def default(owner: Callable[..., Any], name: str) -> Any:
    """The default OWNER (a dataclass, or a function) gives its field or parameter NAME: the one place that
    default is written."""
    if dataclasses.is_dataclass(owner):
        value = _field(owner, name).default
    else:
        value = inspect.signature(owner).parameters[name].default
    if value in (dataclasses.MISSING, inspect.Parameter.empty):
        raise TypeError(f"{owner.__name__}: {name} has no default")
    return value


def field_option(owner: Callable[..., Any], name: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option for field or parameter NAME of OWNER (a dataclass, or the function the command calls;
    declared `--name-with-dashes` unless DECLS say otherwise), defaulting to OWNER's default (shown in --help),
    with a dataclass field's `help` metadata as its help unless KWARGS give one."""
    if dataclasses.is_dataclass(owner):
        kwargs.setdefault("help", _field(owner, name).metadata.get("help"))
    return click.option(
        *(decls or (f"--{name.replace('_', '-')}",)), default=default(owner, name), show_default=True, **kwargs
    )


def _field(cls: Callable[..., Any], name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise TypeError(f"{cls.__name__} has no field {name}")


def apply(options: list[Callable[[F], F]], f: F) -> F:
    """F decorated with OPTIONS, in the order --help lists them."""
    for option in reversed(options):
        f = option(f)
    return f


def hardware_options(f: F) -> F:
    """--vram/--ram/--reserve/--cpu/--max-quant/--min-quant/--prefer (planner.HardwareOptions), for `plan`,
    `embed --auto-quant`, `embed-dataset` and `serve`; `HardwareOptions(**those)` holds what they said."""
    return apply(
        [
            click.option("--vram", help="Free GPU memory to plan for, e.g. 12GiB, or 8GiB,8GiB for two GPUs."),
            click.option("--ram", help="Free RAM to plan for, e.g. 16GiB (default: what the machine has free)."),
            field_option(HardwareOptions, "reserve", help="Memory kept back on every device."),
            click.option("--cpu", is_flag=True, help="Plan for the CPU only."),
            click.option("--max-quant", help="Highest-fidelity quant to consider (e.g. Q8_0)."),
            click.option("--min-quant", help="Lowest quant to accept (e.g. Q4_K_M)."),
            field_option(
                HardwareOptions,
                "prefer",
                type=click.Choice(PREFERENCES),
                help="CPU plans: the most faithful quant, the fastest keeping >= 0.999 cosine to F16 as measured on "
                "the model (`runner retention`), or the fastest at Q4_K_M or above (speeds from `runner calibrate`).",
            ),
        ],
        f,
    )


def max_length_option(f: F) -> F:
    """--max-length, for every command that loads or plans a model."""
    return click.option(
        "--max-length", type=AT_LEAST_1, help="Truncate inputs to this many tokens (default: the model's)."
    )(f)


def threads_option(f: F) -> F:
    """--threads for the engine; the engine bounds it by the logical CPUs."""
    return click.option("--threads", type=AT_LEAST_1, help="Engine threads (default: physical cores).")(f)


def packed_option(f: F) -> F:
    """--packed/--one-per-batch: how the engine groups texts into micro-batches (runner.engine.Engine's packed)."""
    return click.option(
        "--packed/--one-per-batch",
        default=None,
        help="Several texts per llama.cpp micro-batch: faster for short texts, but a text's vector then depends on "
        "what else it was embedded with (cosine >= 0.9998 to its vector alone at Q8_0 and below). Default: on the "
        "CPU one text per micro-batch (the same bits in any batch), packed with GPU layers.",
    )(f)


def model_option(f: F) -> F:
    """-m/--model: what quantize.reference.ModelRef parses."""
    return click.option(
        "-m",
        "--model",
        required=True,
        help="GGUF file, model directory, HF checkpoint directory, models.toml name, or hub repo id (owner/name).",
    )(f)
