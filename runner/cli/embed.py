"""`runner embed` (texts or a file, on this machine) and `runner embed-dataset` (files into parquet shards, Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from planner import HardwareOptions
from quantize.errors import BadInput
from runner.cli.options import (
    AT_LEAST_1,
    field_option,
    hardware_options,
    max_length_option,
    model_option,
    packed_option,
    threads_option,
)
from runner.compact import PRECISIONS, RANGED
from runner.distributed import embed_dataset
from runner.embed_run import EmbedOptions
from runner.io import FORMATS

# Both commands read their inputs with runner.inputs, so they take bad bytes alike.
errors_option = click.option(
    "--errors",
    type=click.Choice(["strict", "replace"]),
    default="strict",
    show_default=True,
    help="Input bytes that are not UTF-8: stop with the line number, or replace them.",
)


# Both commands keep a blank line or empty cell alike: an error naming it, or left out and named.
skip_empty_option = click.option(
    "--skip-empty",
    is_flag=True,
    default=False,
    help="Leave out blank lines and empty cells (else an error naming the first); runner embed lists them as "
    "skipped_rows in the output's metadata, embed-dataset's ids stay the input's row numbers.",
)


@click.command()
@click.argument("texts", nargs=-1)
@model_option
@click.option(
    "--quant",
    help="Which quant of a model directory/name to use, pinned for its later runs (default: the pinned quant, else "
    "the highest fidelity on disk).",
)
@click.option(
    "--input", "input_file", help=".txt (one text per line), .jsonl, .csv/.tsv (with a header row) or .parquet file; "
    "- for stdin.",
)  # fmt: skip
@click.option(
    "--field", default="text", show_default=True, help="JSONL field, CSV/TSV or parquet column holding the text."
)
@errors_option
@skip_empty_option
@click.option(
    "-o",
    "--output",
    help="Output file (.npy, .jsonl or .parquet); default: JSON lines on stdout. A .npy or .jsonl file gets "
    "<output>.json beside it and a parquet file schema metadata naming the model file (quant, sha256) and the "
    "options; stdout and streams get none.",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Default: from --output.")
@field_option(
    EmbedOptions,
    "precision",
    "--precision",
    "--dtype",
    type=click.Choice(PRECISIONS),
    help="As sentence-transformers' quantize_embeddings: int8/uint8 in 256 buckets per dimension (ranges from "
    "--ranges, --calibration or the data; saved beside the output), binary/ubinary 8 dimensions a byte.",
)
@click.option("--ranges", "ranges_file", help="int8/uint8: ranges saved by an earlier run (<output>.ranges.npy).")
@click.option("--calibration", help="int8/uint8: texts (.txt/.jsonl) whose vectors give the ranges.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same --output.")
@field_option(EmbedOptions, "query", "--query/--document", help="Apply the model's query instruction, or not.")
@click.option("--task", help="Instruction for --query (default: the model's).")
@field_option(EmbedOptions, "normalize", "--normalize/--no-normalize", help="L2-normalise vectors.")
@click.option(
    "--dimensions", type=AT_LEAST_1, help="Matryoshka models: keep the first N dimensions (then L2-normalise)."
)
@max_length_option
@click.option("--no-truncate", is_flag=True, help="An input over the max length is an error, not cut.")
@threads_option
@packed_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@field_option(EmbedOptions, "chunk_size", type=AT_LEAST_1, help="Texts per part written to disk, at most.")
@field_option(
    EmbedOptions,
    "part_seconds",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of work per part written to disk, at most: what an interrupted run keeps for --resume.",
)
@click.option(
    "--auto-quant",
    is_flag=True,
    help="Pick the quant and GPU layers for this machine (runner plan); a pinned model keeps its quant.",
)
@click.option(
    "--keep-f16/--no-keep-f16",
    default=True,
    show_default=True,
    help="Keep the F16 GGUF a missing quant is made from: the source of every other quant (2 bytes a parameter, "
    "14 GiB for an 8B model).",
)
@hardware_options
def embed(
    texts: tuple[str, ...],
    model: str,
    quant: str | None,
    input_file: str | None,
    field: str,
    errors: str,
    output: str | None,
    fmt: str | None,
    ranges_file: str | None,
    calibration: str | None,
    resume: bool,
    no_truncate: bool,
    max_length: int | None,
    threads: int | None,
    packed: bool | None,
    quiet: bool,
    auto_quant: bool,
    keep_f16: bool,
    precision: str,
    query: bool,
    task: str | None,
    normalize: bool,
    dimensions: int | None,
    chunk_size: int,
    part_seconds: float,
    skip_empty: bool,
    **hw_opts,
) -> None:
    """Embed TEXTS (or --input) with a GGUF embedder."""
    import itertools

    from quantize.progress import Progress
    from runner.embed_run import run_embed
    from runner.inputs import count_texts, read_texts
    from runner.io import OutputLock, output_format
    from runner.pipeline import open_pipeline

    if not texts and not input_file:
        raise BadInput("nothing to embed; pass texts as arguments or --input FILE")
    if (ranges_file or calibration) and precision not in RANGED:
        raise BadInput(f"--ranges and --calibration are for --precision int8 or uint8, not {precision}")
    if ranges_file and calibration:
        raise BadInput("--ranges or --calibration: one source of int8/uint8 ranges, not both")
    if input_file and input_file != "-" and not Path(input_file).is_file():
        raise BadInput(f"{input_file}: no such input file")
    fmt = output_format(output, fmt)
    if output:  # one run owns an output: a second one is refused now, before it loads a model (until we exit)
        click.get_current_context().with_resource(OutputLock(Path(output)))
    options = EmbedOptions(query, task, normalize, dimensions, not no_truncate, precision, chunk_size, part_seconds)
    # Read lazily: the texts stream through the pipeline a chunk at a time, whatever the input's size.
    skipped: list[int] | None = [] if skip_empty else None  # the input's rows left out, filled as it is read
    items = itertools.chain(texts, read_texts(input_file, field, errors, skipped) if input_file else ())
    total = None if input_file == "-" else len(texts) + ((count_texts(input_file) or 0) if input_file else 0)

    def show_plan(p) -> None:
        if not quiet:
            click.echo(p.summary(), err=True)
            if input_file and input_file != "-":  # counted by size: the model may not be on disk yet
                from runner.cli.plan import input_estimate

                click.echo(input_estimate(p, input_file, None).line(p.chosen.quant), err=True)

    with open_pipeline(
        model, quant, auto_quant=auto_quant, max_length=max_length, threads=threads,
        hardware=HardwareOptions(**hw_opts), on_plan=show_plan, keep_f16=keep_f16, progress=Progress.stderr(quiet),
        packed=packed,
    ) as pipeline:  # fmt: skip
        run = run_embed(
            pipeline, items, output, fmt, options, resume=resume, ranges_file=ranges_file,
            calibration=read_texts(calibration, field, errors) if calibration else None, total=total,
            show_progress=not quiet and sys.stderr.isatty(), skipped_rows=skipped,
        )  # fmt: skip
    counts = run.counts
    if skipped:
        rows = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        listed = f"; all in {output}'s metadata (skipped_rows)" if output else ""
        click.echo(f"note: skipped {len(skipped)} empty row(s) of {input_file} (rows {rows}){listed}", err=True)
    if counts.truncated:
        click.echo(
            f"warning: truncated {counts.truncated} input(s) to {pipeline.max_length} tokens (--no-truncate to refuse)",
            err=True,
        )
    if counts.texts + counts.skipped == 0:
        click.echo(f"note: {input_file} holds no texts; wrote an empty output", err=True)
    if not quiet:
        resumed = f" ({counts.skipped} from the interrupted run)" if counts.skipped else ""
        where = f" -> {output}" if output else ""
        model = pipeline.model
        device = f" on {pipeline.plan.device}" if pipeline.plan else ""
        click.echo(
            f"embedded {counts.texts} texts{resumed}, {counts.tokens} tokens in {run.seconds:.1f} s "
            f"({counts.tokens / max(run.seconds, 1e-9):.0f} tokens/s; {model.path.name}, {model.quant}{device}){where}",
            err=True,
        )
    if run.ranges_saved is not None:  # said even with -q: without these ranges, queries cannot be quantized alike
        saved = run.ranges_saved
        click.echo(f"{precision} ranges saved to {saved}; quantize queries alike with --ranges {saved}", err=True)


@click.command(name="embed-dataset")
@click.argument("inputs", nargs=-1, required=True)
@click.argument("output_dir")
@model_option
@field_option(
    embed_dataset,
    "quant",
    help="A quant (pinned for the model's later runs), or auto (planned, see the hardware options; a pinned model "
    "keeps its quant).",
)
@click.option("--address", help="Ray cluster: auto (a running one), ray://HOST:PORT, or local (default: local).")
@field_option(embed_dataset, "workers", type=AT_LEAST_1, help="Ray actors, one model each.")
@field_option(embed_dataset, "gpus_per_worker", type=click.FloatRange(0), help="0: CPU workers.")
@field_option(embed_dataset, "column", help="Text column (parquet, csv/tsv) or field (jsonl).")
@click.option("--id-column", help="Column/field holding each row's id (default: the row's number in the input).")
@field_option(embed_dataset, "shard_rows", type=AT_LEAST_1, help="Rows per output shard.")
@field_option(
    embed_dataset,
    "cpus_per_worker",
    type=AT_LEAST_1,
    help="CPU cores for each worker, llama.cpp's threads (default: the cluster's cores divided by --workers).",
)
@errors_option
@skip_empty_option
@field_option(embed_dataset, "overwrite", is_flag=True, help="Empty OUTPUT_DIR of the parts of another run first.")
@field_option(embed_dataset, "query", "--query/--document", help="Apply the model's query instruction, or not.")
@click.option("--task", help="Instruction for --query (default: the model's).")
@max_length_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@field_option(embed_dataset, "verbose", "-v", "--verbose", is_flag=True, help="Show Ray's own logs and progress bars.")
@hardware_options
def embed_dataset_cmd(
    inputs: tuple[str, ...],
    output_dir: str,
    model: str,
    quant: str,
    address: str | None,
    workers: int,
    gpus_per_worker: float,
    column: str,
    id_column: str | None,
    shard_rows: int,
    cpus_per_worker: int | None,
    errors: str,
    skip_empty: bool,
    overwrite: bool,
    query: bool,
    task: str | None,
    max_length: int | None,
    quiet: bool,
    verbose: bool,
    **hw_opts,
) -> None:
    """Embed INPUTS (parquet/jsonl/txt files, globs, object-store URIs) into parquet shards in OUTPUT_DIR with
    Ray (extra `ray`); a rerun with the same model, options and inputs writes only the shards not complete."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise BadInput("runner embed-dataset needs Ray Data: pip install 'llm-embed-runner[ray]'") from None

    s = embed_dataset(
        list(inputs), output_dir, model, quant, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, column=column, id_column=id_column, shard_rows=shard_rows, errors=errors,
        skip_empty=skip_empty, query=query, task=task, max_length=max_length, overwrite=overwrite,
        hardware=HardwareOptions(**hw_opts), progress=not quiet and sys.stderr.isatty(), verbose=verbose,
        on_plan=None if quiet else lambda line: click.echo(line, err=True),
    )  # fmt: skip
    if not quiet:
        skipped = f", {s.skipped_shards} already complete" if s.skipped_shards else ""
        threads = f" x {s.threads} threads" if s.threads else ""
        model = f"; {s.model.path.name}, {s.model.quant}" if s.model else ""
        click.echo(
            f"embedded {s.rows} rows into {s.shards} shards{skipped} in {s.seconds:.1f} s "
            f"({s.rows / max(s.seconds, 1e-9):.0f} rows/s, {workers} workers{threads}{model}) -> {output_dir}",
            err=True,
        )
        if s.truncated:
            click.echo(f"warning: truncated {s.truncated} input(s) (column `truncated` marks them)", err=True)
