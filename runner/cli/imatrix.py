"""`runner imatrix`: an importance matrix measured the way the embedder runs (quantize/imatrix.py)."""

from __future__ import annotations

from pathlib import Path

import click

from runner.cli.options import AT_LEAST_1


@click.command()
@click.option("-m", "--model", "model", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The GGUF to measure: the F16 (or F32/BF16) file every quant is made from.")  # fmt: skip
@click.option("--texts", type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration texts: .jsonl (strings, or objects with `text` and `query`) or .txt, one per line. "
              "Default: the shipped set (quantize/data/README.md).")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Default: <model stem>.imatrix.gguf beside the model, where --imatrix auto finds it.")  # fmt: skip
@click.option("--threads", type=AT_LEAST_1, help="Default: the physical cores.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary line.")
def imatrix(model: Path, texts: Path | None, output: Path | None, threads: int | None, quiet: bool) -> None:
    """Run MODEL in embedding mode over calibration texts and save its importance matrix in llama.cpp's imatrix
    GGUF format (`runner quantize --imatrix FILE` and `llama-quantize --imatrix FILE` read it); prints its path.
    MODEL runs where the planner places it (on the GPU where it fits)."""
    from quantize.imatrix import make, placement
    from quantize.progress import Progress

    where = placement(model) if model.is_file() else (0, None)  # a missing file gets make's one-line error
    click.echo(str(make(model, texts, output, threads, Progress.stderr(quiet), where)))
