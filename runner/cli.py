"""`runner`: convert, quantize and embed from the shell. A thin shell over quantize/ and runner/."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from quantize.errors import BadInput, UserError
from quantize.quants import LADDER, PREFERENCE


class _OneLine(logging.Formatter):
    """`warning: message` on stderr, as the CLI's own errors read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {_one_line(record.getMessage())}"


def _one_line(message: object) -> str:
    """MESSAGE with line breaks and control characters escaped: an error is one line, and text from a hostile
    file (a key, a name) must not drive the terminal with escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


class _Cli(click.Group):
    """Turns UserError into one line and a non-zero exit; tracebacks only with --debug."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "serve"})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "serve":  # imported when used: FastAPI stays out of the other commands
            from runner.server import serve_command

            return serve_command
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(1)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt as e:
            # Ctrl-C: say what is safe and how to go on (a command may say it in E), and exit as Unix tools do.
            click.echo(f"interrupted{': ' + str(e) if str(e) else ''}", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # The reader went away (`runner models | head -3`): stop quietly, as Unix tools do; stdout goes
            # to /dev/null so the interpreter's last flush does not fail a second time.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a tool a closed pipe stopped
        except OSError as e:  # the file system said no (permissions, a full disk): name the file
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {_one_line(f'{e.filename}: ' if e.filename else '')}{e.strerror or e}", err=True)
            sys.exit(1)
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for a traceback)", err=True)
            sys.exit(2)


@click.group(cls=_Cli)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run LLM text embedders through llama.cpp."""
    ctx.obj = {"debug": debug}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("runner")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


@main.command()
@click.argument("source")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), help="Default: the models cache.")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), default="f16", show_default=True)
@click.option("--revision", help="Hub revision (branch, tag or commit) to download.")
@click.option("--as-embedder", is_flag=True, help="Run a causal-LM checkpoint as an embedder (its LM head dropped).")
@click.option(
    "--pooling",
    type=click.Choice(["mean", "last", "cls"]),
    help="Pooling to record (unregistered checkpoints; default: the sentence-transformers files', else mean).",
)
@click.option(
    "--causal/--bidirectional",
    default=None,
    help="Attention to record (unregistered checkpoints; default bidirectional). Required with last pooling.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no summary lines.")
def convert(
    source: str,
    outdir: Path | None,
    outtype: str,
    revision: str | None,
    as_embedder: bool,
    pooling: str | None,
    causal: bool | None,
    quiet: bool,
) -> None:
    """Convert SOURCE (HF directory, models.toml name, or hub repo id) to one GGUF; prints its path.

    A file already converted from the same, unchanged source is reused. Refused before the download when the
    disk cannot hold the download and the GGUF (`runner plan` shows both).
    """
    from planner.disk import for_convert
    from quantize import gguf_keys
    from quantize.convert import convert as run_convert
    from quantize.manifest import read_metadata
    from quantize.progress import Progress

    for_convert(source, outdir, outtype, revision, as_embedder, pooling, causal).check()
    path = run_convert(
        source, outdir=outdir, outtype=outtype, revision=revision, as_embedder=as_embedder,
        progress=Progress.stderr(quiet), pooling=pooling, causal=causal,
    )  # fmt: skip
    meta = read_metadata(path)
    if note := meta.get(gguf_keys.LICENSE_NOTE):
        click.echo(f"licence: {note}", err=True)
    click.echo(str(path))


@main.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--quant", "quants", multiple=True, type=click.Choice(LADDER, case_sensitive=False))
@click.option("--all", "all_quants", is_flag=True, help="The whole ladder: " + ", ".join(LADDER))
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), help="Default: next to GGUF_FILE.")
@click.option("--threads", type=int, help="Default: all cores.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no summary lines.")
def quantize(
    gguf_file: Path, quants: tuple[str, ...], all_quants: bool, outdir: Path | None, threads: int | None, quiet: bool
) -> None:
    """Quantize an F16/F32/BF16 GGUF with llama.cpp's quantizer; writes <stem>-<QUANT>.gguf + manifest.json."""
    from planner.disk import for_quantize
    from quantize.ladder import quantize as run_quantize
    from quantize.progress import Progress

    chosen = LADDER if all_quants else [q.upper() for q in quants]
    if not chosen:
        raise BadInput("no quant chosen; pass --quant Q8_0 (repeatable) or --all")
    if gguf_file.is_file():  # a missing file gets the quantizer's own one-line error
        for_quantize(gguf_file, chosen, outdir).check()
    for path in run_quantize(gguf_file, chosen, outdir=outdir, threads=threads, progress=Progress.stderr(quiet)):
        click.echo(str(path))


def hardware_options(f):
    """--vram/--ram/--reserve/--cpu/--max-quant/--min-quant/--prefer, shared by `plan`, `embed --auto-quant`
    and `serve`."""
    options = [
        click.option("--vram", help="Free GPU memory to plan for, e.g. 12GiB, or 8GiB,8GiB for two GPUs."),
        click.option("--ram", help="Free RAM to plan for, e.g. 16GiB (default: what the machine has free)."),
        click.option("--reserve", default="1GiB", show_default=True, help="Memory kept back on every device."),
        click.option("--cpu", is_flag=True, help="Plan for the CPU only."),
        click.option("--max-quant", help="Highest-fidelity quant to consider (e.g. Q8_0)."),
        click.option("--min-quant", help="Lowest quant to accept (e.g. Q4_K_M)."),
        click.option(
            "--prefer",
            type=click.Choice(["fidelity", "balanced", "speed"]),
            default="balanced",
            show_default=True,
            help="CPU plans: the most faithful quant, the fastest keeping >= 0.999 cosine to F16, or the fastest "
            "at Q4_K_M or above (speeds from `runner calibrate`).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _hardware(hw_opts: dict):
    from planner import HardwareOptions

    return HardwareOptions(**hw_opts)


@main.command(name="plan")
@click.option("-m", "--model", required=True, help="Registry name, HF directory (config.json is enough), or GGUF.")
@click.option("--quant", help="Plan this quant only (it always wins).")
@click.option("--max-length", type=int, help="Longest sequence to hold (default: the model's, capped at 8192).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
@hardware_options
def plan_cmd(model: str, quant: str | None, max_length: int | None, as_json: bool, **hw_opts) -> None:
    """Which quant runs where on this machine: every quant's size and memory, the chosen one marked."""
    import json

    from planner import plan_for

    p = plan_for(model, quant, max_length, _hardware(hw_opts))
    if as_json:
        click.echo(json.dumps(p.as_json(), indent=2))
        return
    gib = 2**30
    hw = p.hardware
    gpus = ", ".join(f"GPU{g.index} {g.name} {g.free / gib:.1f} GiB free" for g in hw.gpus) or "no GPU"
    if hw.gpus and not hw.offload:
        gpus += " (this llama-cpp-python build cannot offload: rebuild with CMAKE_ARGS=-DGGML_CUDA=on)"
    click.echo(f"{p.shape.name}: max length {p.settings.max_length} (n_ubatch {p.settings.ubatch})")
    click.echo(f"hardware: {gpus}; RAM {hw.ram_free / gib:.1f} GiB free; {hw.cores} cores ({hw.source})")
    click.echo(f"  {'quant':<8}{'file':>10}{'GPU':>10}{'RAM':>10}{'CPU tok/s':>11}{'cos F16':>9}  fits")
    for r in p.rows:
        mark = ">" if r is p.chosen or r.quant == p.chosen.quant else " "
        fits = {"split": f"split, {r.n_gpu_layers}/{p.shape.layers} layers on GPU"}.get(r.fits, r.fits)
        speed = f"{r.cpu_tokens_per_s:.1f}" if r.cpu_tokens_per_s else "?"
        cosine = f"{r.retention:.4f}" if r.retention else "?"
        click.echo(
            f"{mark} {r.quant:<8}{r.needs.file / gib:>9.2f}G{r.needs.gpu_total / gib:>9.2f}G"
            f"{r.needs.ram / gib:>9.2f}G{speed:>11}{cosine:>9}  {fits}"
        )
    if not any(r.cpu_tokens_per_s for r in p.rows):
        click.echo("CPU tok/s: not measured on this machine; `runner calibrate -m MODEL` measures it (~2 minutes).")
    click.echo(f"chosen: {p.chosen.quant} on {p.device} — {p.reason}.")
    if p.disk and p.disk.items:
        _show_disk(p.disk)


def _show_disk(disk) -> None:
    """`runner plan`'s disk table: each thing the run needs, its size, whether it is there, and where."""
    from quantize.progress import size

    click.echo(f"{disk.summary()}:")
    for i in disk.items:
        state = "on disk" if not i.needs else ("to write" if not i.have else f"{size(i.have)} cached")
        note = f"  ({disk.download_from})" if i.what == "download" else ("" if i.exact else "  (estimated)")
        click.echo(f"  {i.what:<9}{size(i.bytes):>11}  {state:<10}{i.path}{note}")


@main.command()
@click.argument("texts", nargs=-1)
@click.option("-m", "--model", required=True, help="GGUF file, model directory, or models.toml name.")
@click.option("--quant", help="Which quant of a model directory/name to use (default: highest fidelity on disk).")
@click.option("--input", "input_file", help=".txt (one text per line) or .jsonl file; - for stdin.")
@click.option("--field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option(
    "--errors",
    type=click.Choice(["strict", "replace"]),
    default="strict",
    show_default=True,
    help="Input bytes that are not UTF-8: stop with the line number, or replace them.",
)
@click.option("-o", "--output", help="Output file (.npy, .jsonl or .parquet); default: JSON lines on stdout.")
@click.option("--format", "fmt", type=click.Choice(["npy", "jsonl", "parquet"]), help="Default: from --output.")
@click.option(
    "--precision",
    "--dtype",
    "precision",
    type=click.Choice(["float32", "float16", "int8", "uint8", "binary", "ubinary"]),
    default="float32",
    show_default=True,
    help="As sentence-transformers' quantize_embeddings: int8/uint8 in 256 buckets per dimension (ranges from "
    "--ranges, --calibration or the data; saved beside the output), binary/ubinary 8 dimensions a byte.",
)
@click.option("--ranges", "ranges_file", help="int8/uint8: ranges saved by an earlier run (<output>.ranges.npy).")
@click.option("--calibration", help="int8/uint8: texts (.txt/.jsonl) whose vectors give the ranges.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same --output.")
@click.option("--query/--document", default=False, help="Apply the model's query instruction (default: document).")
@click.option("--task", help="Instruction for --query (default: the model's).")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalise vectors.")
@click.option("--dimensions", type=int, help="Matryoshka models: keep the first N dimensions (then L2-normalise).")
@click.option("--max-length", type=int, help="Truncate inputs to this many tokens (default: the model's).")
@click.option("--no-truncate", is_flag=True, help="An input over the max length is an error, not cut.")
@click.option("--threads", type=int, help="Default: physical cores.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@click.option("--chunk-size", type=int, default=2048, show_default=True, help="Texts per part written to disk.")
@click.option("--auto-quant", is_flag=True, help="Pick the quant and GPU layers for this machine (runner plan).")
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
    precision: str,
    ranges_file: str | None,
    calibration: str | None,
    resume: bool,
    query: bool,
    task: str | None,
    normalize: bool,
    dimensions: int | None,
    max_length: int | None,
    no_truncate: bool,
    threads: int | None,
    quiet: bool,
    chunk_size: int,
    auto_quant: bool,
    keep_f16: bool,
    **hw_opts,
) -> None:
    """Embed TEXTS (or --input) with a GGUF embedder."""
    import itertools
    import time

    from tqdm import tqdm

    from quantize.progress import Progress
    from runner import compact
    from runner.io import OutputLock, VectorSink, count_lines, output_format, read_texts, run_key
    from runner.pipeline import Stats, open_pipeline

    if not texts and not input_file:
        raise BadInput("nothing to embed; pass texts as arguments or --input FILE")
    if max_length is not None and max_length < 1:
        raise BadInput(f"--max-length {max_length}: must be at least 1")
    if chunk_size < 1:
        raise BadInput(f"--chunk-size {chunk_size}: must be at least 1")
    if (ranges_file or calibration) and precision not in ("int8", "uint8"):
        raise BadInput(f"--ranges and --calibration are for --precision int8 or uint8, not {precision}")
    if ranges_file and calibration:
        raise BadInput("--ranges or --calibration: one source of int8/uint8 ranges, not both")
    if input_file and input_file != "-" and not Path(input_file).is_file():
        raise BadInput(f"{input_file}: no such input file")
    fmt = output_format(output, fmt)
    if output:  # one run owns an output: a second one is refused now, before it loads a model (until we exit)
        click.get_current_context().with_resource(OutputLock(Path(output)))
    # Read lazily: the texts stream through the pipeline a chunk at a time, whatever the input's size.
    items = itertools.chain(texts, read_texts(input_file, field, errors) if input_file else ())

    def show_plan(p) -> None:
        if not quiet:
            click.echo(p.summary(), err=True)

    pipeline = open_pipeline(
        model, quant, auto_quant=auto_quant, max_length=max_length, threads=threads,
        hardware=_hardware(hw_opts), on_plan=show_plan, keep_f16=keep_f16, progress=Progress.stderr(quiet),
    )  # fmt: skip
    options = dict(query=query, task=task, normalize=normalize, max_length=pipeline.max_length, fmt=fmt)
    options["dtype"] = precision
    with pipeline:
        dims = pipeline.check_dimensions(dimensions) or pipeline.dims  # refused before any input is read
        options |= {"dimensions": dims} if dims != pipeline.dims else {}
        ranges = None
        if ranges_file:
            ranges = compact.load_ranges(ranges_file, dims)
        elif calibration:  # embedded like the input (prompt, normalisation, dimensions): the ranges fit its vectors
            found = pipeline.embed(
                list(read_texts(calibration, field, errors)), query=query, task=task, normalize=normalize,
                dimensions=dimensions,
            )  # fmt: skip
            ranges = compact.ranges_of(found)
        # Only a file output can be resumed, so only then is the model's content identity needed.
        key = run_key(pipeline.model.path, options | {"chunk": chunk_size}) if output else ""
        sink = VectorSink(output, fmt, precision, key, resume, ranges)
        stats, started = Stats(), time.perf_counter()
        total = None if input_file == "-" else len(texts) + ((count_lines(input_file) or 0) if input_file else 0)
        show = not quiet and sys.stderr.isatty()
        with tqdm(total=total, unit="text", file=sys.stderr, delay=1.0, disable=not show) as bar:
            chunks = pipeline.stream(
                items, chunk_size, run_key=key, skip=sink.done, stats=stats,
                query=query, task=task, normalize=normalize, truncate=not no_truncate, dimensions=dimensions,
            )  # fmt: skip
            try:
                for chunk in chunks:
                    if chunk.vectors is not None:
                        sink.write(chunk.index, chunk.digest, chunk.vectors, chunk.first)
                    bar.update(chunk.count)
                    rate = stats.tokens / (time.perf_counter() - started)
                    bar.set_postfix_str(f"{rate:.0f} tokens/s", refresh=False)
            except KeyboardInterrupt:
                sink.abandon()
                raise KeyboardInterrupt(sink.interrupted()) from None
            except BaseException:
                sink.abandon()
                raise
        saved = sink.finish(dims)
    seconds = time.perf_counter() - started
    if stats.truncated:
        click.echo(
            f"warning: truncated {stats.truncated} input(s) to {pipeline.max_length} tokens (--no-truncate to refuse)",
            err=True,
        )
    if stats.texts + stats.skipped == 0:
        click.echo(f"note: {input_file} holds no texts; wrote an empty output", err=True)
    if not quiet:
        resumed = f" ({stats.skipped} from the interrupted run)" if stats.skipped else ""
        where = f" -> {output}" if output else ""
        plan_note = f", {pipeline.plan.chosen.quant} on {pipeline.plan.device}" if pipeline.plan else ""
        click.echo(
            f"embedded {stats.texts} texts{resumed}, {stats.tokens} tokens in {seconds:.1f} s "
            f"({stats.tokens / max(seconds, 1e-9):.0f} tokens/s; {pipeline.model.path.name}{plan_note}){where}",
            err=True,
        )
    if saved is not None:  # said even with -q: without these ranges, queries cannot be quantized alike
        click.echo(f"{precision} ranges saved to {saved}; quantize queries alike with --ranges {saved}", err=True)


@main.command()
@click.option("-m", "--model", default="llama-embed-nemotron-8b", show_default=True, help="Whose layer shape to time.")
@click.option("--quants", default="F16,Q8_0,Q6_K,Q5_K_M,Q5_K_S,Q4_K_M", show_default=True, help="Comma-separated.")
@click.option("--repeats", type=click.IntRange(1, 20), default=2, show_default=True, help="Timed runs per quant.")
@click.option("--threads", type=click.IntRange(1, 1024), help="Default: physical cores (what the engine uses).")
def calibrate(model: str, quants: str, repeats: int, threads: int | None) -> None:
    """Time each quant on this CPU on MODEL's layer shape; `--auto-quant` and `runner plan` then use it."""
    from tqdm import tqdm

    from planner import calibration
    from planner.shapes import resolve_shape
    from quantize.quants import FIDELITY
    from runner.calibrate import calibrate as run_calibrate

    chosen = [q.strip().upper() for q in quants.split(",") if q.strip()]
    if unknown := [q for q in chosen if q not in FIDELITY]:
        raise BadInput(f"--quants {','.join(unknown)}: unknown quant; choose from {', '.join(FIDELITY)}")
    shape = resolve_shape(model)
    steps = 1 + len(chosen) + sum(q != "F16" for q in chosen)  # write, then quantize (not F16) and time each
    with tqdm(total=steps, file=sys.stderr, disable=not sys.stderr.isatty(), unit="step") as bar:

        def step(message: str) -> None:
            bar.set_description_str(message)
            bar.update(1)

        result = run_calibrate(shape, tuple(chosen), threads, repeats, progress=step)
    path = calibration.save(result)
    predicted = result.predict(shape)
    click.echo(f"{result.identity['cpu']}, {result.identity['threads']} threads, llama-cpp-python "
               f"{result.identity['llama_cpp_python']}: {shape.name}'s layer shape")  # fmt: skip
    click.echo(f"  {'quant':<8}{f'tok/s ({result.layers} layers)':>22}{f'predicted ({shape.layers} layers)':>26}")
    for q, tps in result.tokens_per_s.items():
        click.echo(f"  {q:<8}{tps:>22.1f}{predicted[q]:>26.1f}")
    click.echo(f"saved to {path}")


@main.command(name="embed-dataset")
@click.argument("inputs", nargs=-1, required=True)
@click.argument("output_dir")
@click.option("-m", "--model", required=True, help="GGUF file, model directory, or models.toml name.")
@click.option(
    "--quant", default="auto", show_default=True, help="A quant, or auto (planned; see the hardware options)."
)
@click.option("--address", help="Ray cluster: auto (a running one), ray://HOST:PORT, or local (default: local).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Ray actors, one model each.")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0, show_default=True, help="0: CPU workers.")
@click.option("--column", default="text", show_default=True, help="Text column (parquet) or field (jsonl).")
@click.option("--id-column", help="Column/field holding each row's id (default: the row's number in the input).")
@click.option("--shard-rows", type=click.IntRange(1), default=10_000, show_default=True, help="Rows per output shard.")
@click.option("--query/--document", default=False, help="Apply the model's query instruction (default: document).")
@click.option("--task", help="Instruction for --query (default: the model's).")
@click.option("--max-length", type=int, help="Truncate inputs to this many tokens (default: the model's).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
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
    query: bool,
    task: str | None,
    max_length: int | None,
    quiet: bool,
    **hw_opts,
) -> None:
    """Embed INPUTS (parquet/jsonl/txt files, globs, object-store URIs) into parquet shards in OUTPUT_DIR with
    Ray (extra `ray`); a rerun skips the shards already complete."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise BadInput("runner embed-dataset needs Ray Data: pip install 'llm-embed-runner[ray]'") from None
    from runner.distributed import embed_dataset

    s = embed_dataset(
        list(inputs), output_dir, model, quant, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
        column=column, id_column=id_column, shard_rows=shard_rows, query=query, task=task, max_length=max_length,
        hardware=_hardware(hw_opts), progress=not quiet and sys.stderr.isatty(),
    )  # fmt: skip
    if not quiet:
        skipped = f", {s.skipped_shards} already complete" if s.skipped_shards else ""
        click.echo(
            f"embedded {s.rows} rows into {s.shards} shards{skipped} in {s.seconds:.1f} s "
            f"({s.rows / max(s.seconds, 1e-9):.0f} rows/s, {workers} workers) -> {output_dir}",
            err=True,
        )
        if s.truncated:
            click.echo(f"warning: truncated {s.truncated} input(s) (column `truncated` marks them)", err=True)


@main.command()
@click.option(
    "--prune", is_flag=True, help="First remove what no run will use: temp files of killed runs, quants of an older "
    "conversion than the F16 beside them, pooling heads no model uses.",
)  # fmt: skip
def models(prune: bool) -> None:
    """List the models.toml registry with the quants already on disk."""
    from quantize.files import models_home
    from quantize.progress import size
    from quantize.registry import load_registry
    from quantize.store import prune as run_prune
    from runner.model import on_disk

    if prune:
        removed = run_prune(models_home())
        for r in removed:
            click.echo(f"pruned {r.path} ({size(r.bytes)}): {r.why}")
        click.echo(f"pruned {len(removed)} file(s), freed {size(sum(r.bytes for r in removed))}")
    for name, entry in load_registry().items():
        files = on_disk(models_home() / name)
        have = ", ".join(f"{q} {p.stat().st_size / 2**30:.2f} GiB" for q, p in files.items()) or "not converted"
        click.echo(f"{name}  ({entry.architecture}, {entry.dims}-d, {entry.pooling} pooling, licence {entry.license})")
        click.echo(f"    source: {entry.package or entry.repo}  on disk: {have}")
        if entry.license_note:
            click.echo(f"    {entry.license_note}")
    # Converted checkpoints (-m HF_DIR, hub repo ids) live beside the registry's models: `runner rm` takes them too.
    home = models_home()
    registry = load_registry()
    for d in sorted(p for p in home.iterdir() if p.is_dir() and p.name not in registry) if home.is_dir() else []:
        if files := on_disk(d):
            have = ", ".join(f"{q} {size(p.stat().st_size)}" for q, p in files.items())
            click.echo(f"{d.name}  (converted checkpoint)\n    on disk: {have}")


@main.command(name="rm")
@click.argument("model")
@click.option(
    "--quant", "quants", multiple=True, type=click.Choice(PREFERENCE, case_sensitive=False),
    help="Remove only this quant's file (repeatable; F16 too). Default: every file of the model.",
)  # fmt: skip
def rm_cmd(model: str, quants: tuple[str, ...]) -> None:
    """Remove MODEL's GGUF files and update its manifest.json; MODEL: a name under the models home (a registry
    name, or a converted checkpoint's) or a model directory holding a manifest.json."""
    from quantize.errors import ModelNotFound
    from quantize.files import models_home
    from quantize.manifest import MANIFEST
    from quantize.progress import size
    from quantize.registry import load_registry
    from quantize.source import cached_snapshot, source_files
    from quantize.store import remove

    directory = models_home() / model
    if not directory.is_dir() and Path(model).expanduser().is_dir():
        directory = Path(model).expanduser()
        if not (directory / MANIFEST).is_file():  # never sweep *.gguf out of a directory we did not make
            raise ModelNotFound(f"{model}: no {MANIFEST} here, so not a model directory this tool made; remove by hand")
    if not any(directory.glob("*.gguf")):
        raise ModelNotFound(f"{model}: no model files in {directory}; `runner models` lists what is on disk")
    removed = remove(directory, [q.upper() for q in quants] or None)
    for r in removed:
        click.echo(f"removed {r.path} ({size(r.bytes)})")
    click.echo(f"freed {size(sum(r.bytes for r in removed))}")
    entry = load_registry().get(model)
    if not quants and entry and entry.repo and not entry.package and (snap := cached_snapshot(entry.repo, None)):
        held = sum(f.stat().st_size for f in source_files(snap))
        click.echo(f"the download ({size(held)}) stays in the Hugging Face cache: `hf cache rm model/{entry.repo}`")


@main.command()
@click.argument("model", required=False)
def verify(model: str | None) -> None:
    """Check GGUF files against the sha256 manifest.json recorded when they were made.

    MODEL: a GGUF file, a model directory or a registry name; default: every model under the models home.
    Exits 1 when a file is missing or differs from its record.
    """
    from quantize.files import models_home
    from quantize.manifest import MANIFEST
    from quantize.manifest import verify as run_verify

    path = Path(model).expanduser() if model else None
    if path is not None and path.is_file():
        results = run_verify(path.parent, only=path.name)
    else:
        if path is not None and path.is_dir():
            directories = [path]
        elif model:
            directories = [models_home() / model]
        else:
            directories = sorted(p.parent for p in models_home().glob(f"*/{MANIFEST}"))
        if model and not (directories[0] / MANIFEST).is_file():
            raise BadInput(f"{model}: no {MANIFEST} there to check against (no such file, directory or model on disk)")
        results = [r for d in directories for r in run_verify(d)]
    bad = unrecorded = 0
    for file, problem in results:
        if problem is None:
            click.echo(f"ok   {file}")
        elif problem.startswith("not in "):
            unrecorded += 1
            click.echo(f"?    {file}: {problem}")
        else:
            bad += 1
            click.echo(f"BAD  {file}: {problem}")
    click.echo(f"{len(results) - bad - unrecorded} ok, {bad} bad, {unrecorded} not recorded", err=True)
    if bad or (path is not None and path.is_file() and unrecorded):
        sys.exit(1)
