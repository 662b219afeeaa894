"""`runner retention`: how much of the F16 vectors each quant of a model keeps, measured on the model itself."""

from __future__ import annotations

from pathlib import Path

import click

from runner.cli.options import model_option, threads_option


@click.command()
@model_option
@click.option("--quant", "quants", multiple=True, help="A quant on disk to measure (repeatable; default: all of them).")
@click.option("--texts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Probe texts: .jsonl (strings, or objects with `text` and `query`) or .txt, one per line. "
              "Default: the shipped probe set (runner/data/probe.jsonl).")  # fmt: skip
@click.option("--limit", type=click.IntRange(2), help="The first N texts, however long they take (default: as many "
              "as fit 10 minutes on this machine).")  # fmt: skip
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def retention(
    model: str, quants: tuple[str, ...], texts: Path | None, limit: int | None, threads: int | None, quiet: bool
) -> None:
    """Embed a probe set with MODEL's F16 file and with each quant, and record the mean and least cosine and the
    top-10 neighbour overlap in its manifest.json (`runner plan` shows them; --prefer balanced trusts only them)."""
    from planner import store_of
    from quantize.progress import Progress
    from quantize.reference import Kind, ModelRef
    from runner.retention import measure, quant_of

    ref = ModelRef.parse(model)
    if ref.kind is Kind.GGUF and not quants:
        quants = (quant_of(ref.path),)
    found = measure(store_of(ref), quants, texts, limit, threads=threads, progress=Progress.stderr(quiet))
    for quant, figures in found.items():
        click.echo(f"{quant}: {figures.summary()}")
