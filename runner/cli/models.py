"""The store's commands: `runner convert`, `quantize`, `models`, `rm` and `verify`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from quantize.errors import BadInput
from quantize.quants import LADDER, PREFERENCE, QUANTS
from runner.cli.options import AT_LEAST_1


@click.command()
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


@click.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--quant", "quants", multiple=True, type=click.Choice(QUANTS, case_sensitive=False))
@click.option("--all", "all_quants", is_flag=True, help="The whole ladder: " + ", ".join(LADDER))
@click.option(
    "--imatrix", metavar="auto|FILE", help="Weigh rounding by an importance matrix (the i-quants need one): FILE "
    "from `runner imatrix`, or auto: GGUF_FILE's own, measured now on the shipped set unless already beside it.",
)  # fmt: skip
@click.option(
    "--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE", help="Give the tensors whose name REGEX "
    "matches this ggml type (as llama-quantize's --tensor-type; repeatable, the first match wins), e.g. "
    "'ffn_down=Q6_K'. Recorded in the file and its manifest.",
)  # fmt: skip
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), help="Default: next to GGUF_FILE.")
@click.option("--threads", type=AT_LEAST_1, help="Default: all cores.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no summary lines.")
def quantize(
    gguf_file: Path,
    quants: tuple[str, ...],
    all_quants: bool,
    imatrix: str | None,
    tensor_types: tuple[str, ...],
    outdir: Path | None,
    threads: int | None,
    quiet: bool,
) -> None:
    """Quantize an F16/F32/BF16 GGUF with llama.cpp's quantizer; writes <stem>-<QUANT>.gguf + manifest.json."""
    from planner.disk import for_quantize
    from quantize.imatrix import for_quantize as imatrix_for
    from quantize.ladder import quantize as run_quantize
    from quantize.ladder import tensor_overrides
    from quantize.progress import Progress
    from runner.retention import after_quantize

    chosen = LADDER if all_quants else [q.upper() for q in quants]
    if not chosen:
        raise BadInput("no quant chosen; pass --quant Q8_0 (repeatable) or --all")
    overrides = []
    for option in tensor_types:
        pattern, _, type_name = option.rpartition("=")
        if not pattern or not type_name:
            raise BadInput(f"--tensor-type {option}: expected REGEX=TYPE, e.g. ffn_down=Q6_K")
        overrides.append((pattern, type_name))
    tensor_overrides(overrides)  # a bad regex or type fails now, before any importance matrix is collected
    if gguf_file.is_file():  # a missing file gets the quantizer's own one-line error
        for_quantize(gguf_file, chosen, outdir).check()
    progress = Progress.stderr(quiet)
    importance = imatrix_for(imatrix, gguf_file, threads, progress) if imatrix else None
    for path in run_quantize(gguf_file, chosen, outdir, threads, progress, importance, overrides):
        click.echo(str(path))
        after_quantize(path, threads, progress)  # measured now when quick (runner.retention), else it says how


@click.command()
@click.option(
    "--prune", is_flag=True, help="First remove what no run will use: temp files of killed runs, quants of an older "
    "conversion than the F16 beside them, pooling heads no model uses.",
)  # fmt: skip
def models(prune: bool) -> None:
    """List the models.toml registry with the quants already on disk, and each model's pinned quant: the one its
    runs use until --quant picks another."""
    from quantize.files import models_home
    from quantize.progress import size
    from quantize.registry import load_registry
    from quantize.store import on_disk
    from quantize.store import prune as run_prune

    if prune:
        removed = run_prune(models_home())
        for r in removed:
            click.echo(f"pruned {r.path} ({size(r.bytes)}): {r.why}")
        click.echo(f"pruned {len(removed)} file(s), freed {size(sum(r.bytes for r in removed))}")
    for name, entry in load_registry().items():
        files = on_disk(models_home() / name)
        have = ", ".join(f"{q} {p.stat().st_size / 2**30:.2f} GiB" for q, p in files.items()) or "not converted"
        click.echo(f"{name}  ({entry.architecture}, {entry.dims}-d, {entry.pooling} pooling, licence {entry.license})")
        click.echo(f"    source: {entry.package or entry.repo}  on disk: {have}{_pin_note(models_home() / name)}")
        if entry.license_note:
            click.echo(f"    {entry.license_note}")
    # Converted checkpoints (-m HF_DIR, hub repo ids) live beside the registry's models: `runner rm` takes them too.
    home = models_home()
    registry = load_registry()
    for d in sorted(p for p in home.iterdir() if p.is_dir() and p.name not in registry) if home.is_dir() else []:
        if files := on_disk(d):
            have = ", ".join(f"{q} {size(p.stat().st_size)}" for q, p in files.items())
            click.echo(f"{d.name}  (converted checkpoint)\n    on disk: {have}{_pin_note(d)}")


def _pin_note(directory: Path) -> str:
    """`; pinned Q6_K` for a model directory with a pin, else nothing (an unreadable manifest says so)."""
    from quantize.errors import UserError
    from quantize.manifest import pinned

    if not directory.is_dir():
        return ""
    try:
        held = pinned(directory)
    except UserError as e:
        return f"; pin unknown ({e})"
    return f"; pinned {held['quant']}" if held else ""


@click.command(name="rm")
@click.argument("model")
@click.option(
    "--quant", "quants", multiple=True, type=click.Choice(PREFERENCE, case_sensitive=False),
    help="Remove only this quant's file (repeatable; F16 too). Default: every file of the model.",
)  # fmt: skip
def rm_cmd(model: str, quants: tuple[str, ...]) -> None:
    """Remove MODEL's GGUF files from the models home and update its manifest.json; MODEL: a name under the models
    home (a registry name, or a converted checkpoint's). Only files its manifest.json records go, never through
    a link."""
    from quantize.progress import size
    from quantize.registry import load_registry
    from quantize.source import cached_snapshot, source_files
    from quantize.store import remove_model

    removed = remove_model(model, [q.upper() for q in quants] or None)
    for r in removed:
        click.echo(f"removed {r.path} ({size(r.bytes)})")
    click.echo(f"freed {size(sum(r.bytes for r in removed))}")
    entry = load_registry().get(model)
    if not quants and entry and entry.repo and not entry.package and (snap := cached_snapshot(entry.repo, None)):
        held = sum(f.stat().st_size for f in source_files(snap))
        click.echo(f"the download ({size(held)}) stays in the Hugging Face cache: `hf cache rm model/{entry.repo}`")


@click.command()
@click.argument("model", required=False)
def verify(model: str | None) -> None:
    """Check GGUF files against the sha256 manifest.json recorded when they were made.

    MODEL: a GGUF file, a model directory or a registry name; default: every model under the models home.
    Exits 1 when a file is missing or differs from its record.
    """
    from quantize.reference import Kind, ModelRef
    from quantize.store import verify as run_verify

    results = run_verify(model)
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
    if bad or (model is not None and ModelRef.parse(model).kind is Kind.GGUF and unrecorded):
        sys.exit(1)
