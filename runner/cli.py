"""`runner`: convert, quantize and embed from the shell. A thin shell over quantize/ and runner/."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from quantize.errors import BadInput, UserError
from quantize.ladder import LADDER


class _Cli(click.Group):
    """Turns UserError into one line and a non-zero exit; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", err=True)
            sys.exit(2)


@click.group(cls=_Cli)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run LLM text embedders through llama.cpp."""
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("source")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), help="Default: the models cache.")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), default="f16", show_default=True)
@click.option("--revision", help="Hub revision (branch, tag or commit) to download.")
@click.option(
    "--as-embedder", is_flag=True, help="Run a causal-LM checkpoint as a bidirectional mean-pooling embedder."
)
def convert(source: str, outdir: Path | None, outtype: str, revision: str | None, as_embedder: bool) -> None:
    """Convert SOURCE (HF directory, models.toml name, or hub repo id) to one GGUF; prints its path."""
    from quantize import gguf_keys
    from quantize.convert import convert as run_convert
    from quantize.ladder import read_metadata, record

    path = run_convert(source, outdir=outdir, outtype=outtype, revision=revision, as_embedder=as_embedder)
    record(path, outtype.upper())
    if note := read_metadata(path).get(gguf_keys.LICENSE_NOTE):
        click.echo(f"licence: {note}", err=True)
    click.echo(str(path))


@main.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--quant", "quants", multiple=True, type=click.Choice(LADDER, case_sensitive=False))
@click.option("--all", "all_quants", is_flag=True, help="The whole ladder: " + ", ".join(LADDER))
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), help="Default: next to GGUF_FILE.")
@click.option("--threads", type=int, help="Default: all cores.")
def quantize(
    gguf_file: Path, quants: tuple[str, ...], all_quants: bool, outdir: Path | None, threads: int | None
) -> None:
    """Quantize an F16/F32/BF16 GGUF with llama.cpp's quantizer; writes <stem>-<QUANT>.gguf + manifest.json."""
    from quantize.ladder import quantize as run_quantize

    chosen = LADDER if all_quants else [q.upper() for q in quants]
    if not chosen:
        raise BadInput("no quant chosen; pass --quant Q8_0 (repeatable) or --all")
    for path in run_quantize(
        gguf_file, chosen, outdir=outdir, threads=threads, progress=lambda m: click.echo(m, err=True)
    ):
        click.echo(str(path))


@main.command()
@click.argument("texts", nargs=-1)
@click.option("-m", "--model", required=True, help="GGUF file, model directory, or models.toml name.")
@click.option("--quant", help="Which quant of a model directory/name to use (default: highest fidelity on disk).")
@click.option("--input", "input_file", help=".txt (one text per line) or .jsonl file; - for stdin.")
@click.option("--field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("-o", "--output", help="Output file (.npy or .jsonl); default: JSON lines on stdout.")
@click.option("--format", "fmt", type=click.Choice(["npy", "jsonl"]), help="Default: from --output's extension.")
@click.option("--query/--document", default=False, help="Apply the model's query instruction (default: document).")
@click.option("--task", help="Instruction for --query (default: the model's).")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalise vectors.")
@click.option("--max-length", type=int, help="Truncate inputs to this many tokens (default: the model's).")
@click.option("--threads", type=int, help="Default: physical cores.")
def embed(
    texts: tuple[str, ...],
    model: str,
    quant: str | None,
    input_file: str | None,
    field: str,
    output: str | None,
    fmt: str | None,
    query: bool,
    task: str | None,
    normalize: bool,
    max_length: int | None,
    threads: int | None,
) -> None:
    """Embed TEXTS (or --input) with a GGUF embedder."""
    from runner.embed import embed_texts
    from runner.engine import Engine
    from runner.io import output_format, read_texts, write_vectors
    from runner.model import resolve_model

    items = list(texts) + (read_texts(input_file, field) if input_file else [])
    if not items:
        raise BadInput("nothing to embed; pass texts as arguments or --input FILE")
    if max_length is not None and max_length < 1:
        raise BadInput(f"--max-length {max_length}: must be at least 1")
    fmt = output_format(output, fmt)
    resolved = resolve_model(model, quant)
    with Engine(resolved.path, n_threads=threads) as engine:
        vectors = embed_texts(
            engine,
            items,
            resolved.prompts,
            query=query,
            task=task,
            max_length=max_length or resolved.max_length,
            normalize=normalize,
        )
    write_vectors(vectors, output, fmt)
    if output:
        click.echo(f"wrote {len(vectors)} x {vectors.shape[1]} vectors to {output}", err=True)


@main.command()
def models() -> None:
    """List the models.toml registry with the quants already on disk."""
    from quantize.files import models_home
    from quantize.registry import load_registry
    from runner.model import on_disk

    for name, entry in load_registry().items():
        files = on_disk(models_home() / name)
        have = ", ".join(f"{q} {p.stat().st_size / 2**30:.2f} GiB" for q, p in files.items()) or "not converted"
        click.echo(f"{name}  ({entry.architecture}, {entry.dims}-d, {entry.pooling} pooling, licence {entry.license})")
        click.echo(f"    source: {entry.package or entry.repo}  on disk: {have}")
        if entry.license_note:
            click.echo(f"    {entry.license_note}")
