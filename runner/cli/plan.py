"""`runner plan` (which quant runs where, and what the disk needs) and `runner calibrate` (this CPU's speeds)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from planner import HardwareOptions, Plan
from planner.estimate import BYTES_PER_TOKEN, Estimate, wall_clock
from quantize.errors import BadInput
from quantize.reference import Kind, ModelRef
from runner.cli.options import AT_LEAST_1, hardware_options, model_option


@click.command(name="plan")
@model_option
@click.option("--quant", help="Plan this quant only (it always wins).")
@click.option("--max-length", type=AT_LEAST_1, help="Longest sequence to hold (default: the model's, capped at 8192).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
@click.option(
    "--input", "input_file", type=click.Path(exists=True, dir_okay=False),
    help="Estimate how long embedding this file takes (its tokens at the calibrated tokens/s).",
)  # fmt: skip
@hardware_options
def plan_cmd(
    model: str, quant: str | None, max_length: int | None, as_json: bool, input_file: str | None, **hw_opts
) -> None:
    """Which quant runs where on this machine: every quant's size and memory, the chosen one marked, and the file
    a run uses (a pinned model keeps its quant: see runner embed --quant)."""
    import json

    from quantize.progress import size
    from runner.model import pin_of, plan_run

    ref = ModelRef.parse(model)
    p = plan_run(ref, quant, max_length, HardwareOptions(**hw_opts), for_run=False)
    held = pin_of(ref)
    file = _planned_file(p, ref)
    estimate = input_estimate(p, input_file, file) if input_file else None
    if as_json:
        found = {"file": str(file) if file else None, "pin": held}
        if estimate is not None:
            found["estimate"] = {"tokens": estimate.tokens, "counted": estimate.counted,
                                 "tokens_per_s": estimate.tokens_per_s, "seconds": estimate.seconds}  # fmt: skip
        click.echo(json.dumps(p.as_json() | found, indent=2))
        return
    gib = 2**30
    hw = p.hardware
    gpus = ", ".join(f"GPU{g.index} {g.name} {g.free / gib:.1f} GiB free" for g in hw.gpus) or "no GPU"
    if hw.gpus and not hw.offload:
        gpus += " (this llama-cpp-python build cannot offload; the chosen line says how to rebuild)"
    click.echo(f"{p.shape.name}: max length {p.settings.max_length} (n_ubatch {p.settings.ubatch})")
    click.echo(f"hardware: {gpus}; RAM {hw.ram_free / gib:.1f} GiB free; {hw.cores} cores ({hw.source})")
    click.echo(f"  {'quant':<8}{'file':>10}{'GPU':>10}{'RAM':>10}{'CPU tok/s':>11}{'cos F16':>12}  fits")
    for r in p.rows:
        mark = ">" if r is p.chosen or r.quant == p.chosen.quant else " "
        fits = {"split": f"split, {r.n_gpu_layers}/{p.shape.layers} layers on GPU"}.get(r.fits, r.fits)
        speed = f"{r.cpu_tokens_per_s:.1f}" if r.cpu_tokens_per_s else "?"
        cosine = "unmeasured" if r.retention is None else f"{r.retention:.5f}"
        sizes = "".join(f"{size(b) if b else '-':>10}" for b in (r.needs.file, r.needs.gpu_total, r.needs.ram))
        click.echo(f"{mark} {r.quant:<8}{sizes}{speed:>11}{cosine:>12}  {fits}")
    if p.calibration is None:
        click.echo("CPU tok/s: not measured on this machine; `runner calibrate -m MODEL` measures it (~2 minutes).")
    else:
        click.echo(f"CPU tok/s: {p.calibration.describe()}.")
    if any(r.retention is None for r in p.rows):
        click.echo(
            "cos F16: mean cosine to the F16 vectors, measured on this model's own files; `runner retention -m MODEL` "
            "measures the quants on disk (unmeasured ones never count for --prefer balanced)."
        )
    click.echo(f"chosen: {p.chosen.quant} on {p.device} — {p.reason}.")
    if ref.kind is Kind.GGUF:
        note = ""  # a GGUF file is its own pin
    elif held is None:
        note = " (the first run pins it)"
    elif held["quant"] == p.chosen.quant:
        note = " (pinned)"
    else:
        note = f" (pinned: {held['quant']}, {held['file']}; a run with --quant {p.chosen.quant} moves the pin)"
    click.echo(f"file: {file or '?'}{note}")
    if estimate is not None:
        click.echo(estimate.line(p.chosen.quant))
    if p.disk and p.disk.items:
        _show_disk(p.disk)


# Inputs up to this size are tokenized for an estimate (seconds on a CPU); larger ones are counted as bytes/4.
TOKENIZE_UP_TO = 16 * 2**20


def input_estimate(p: Plan, input_file: str, gguf: Path | None) -> Estimate:
    """How long INPUT_FILE takes with plan P: its tokens (from GGUF's tokenizer when the file is on disk and the
    input small enough, else its bytes/4) at the calibrated speed of each quant on this CPU."""
    from runner.inputs import read_texts

    speeds = {r.quant: r.cpu_tokens_per_s for r in p.rows if r.fits != "no"} if p.device == "cpu" else {}
    if gguf is not None and gguf.is_file() and Path(input_file).stat().st_size <= TOKENIZE_UP_TO:
        import llama_cpp

        vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
        tokens = sum(len(vocab.tokenize(t.encode(), add_bos=True, special=False)) for t in read_texts(input_file))
        return wall_clock(tokens, "tokenized", p.chosen.quant, speeds)
    return wall_clock(Path(input_file).stat().st_size // BYTES_PER_TOKEN, "bytes/4", p.chosen.quant, speeds)


def _planned_file(p: Plan, ref: ModelRef) -> Path | None:
    """The GGUF file a run of REF with plan P uses: a GGUF file itself, else the chosen quant's in the disk plan."""
    if ref.kind is Kind.GGUF:
        return ref.path
    return next((i.path for i in (p.disk.items if p.disk else ()) if i.what == p.chosen.quant), None)


def _show_disk(disk) -> None:
    """`runner plan`'s disk table: each thing the run needs, its size, whether it is there, and where."""
    from quantize.progress import size

    click.echo(f"{disk.summary()}:")
    for i in disk.items:
        state = "on disk" if not i.needs else ("to write" if not i.have else f"{size(i.have)} cached")
        note = f"  ({disk.download_from})" if i.what == "download" else ("" if i.exact else "  (estimated)")
        click.echo(f"  {i.what:<9}{size(i.bytes):>11}  {state:<10}{i.path}{note}")


@click.command()
@click.option("-m", "--model", default="llama-embed-nemotron-8b", show_default=True, help="Whose layer shape to time.")
@click.option(
    "--quants",
    help="Comma-separated. Default: F16,Q8_0,Q6_K,Q5_K_M,Q5_K_S,Q4_K_M,IQ4_XS, and BF16 where the CPU has BF16 units "
    "(avx512_bf16, amx_bf16).",
)
@click.option(
    "--repeats", type=click.IntRange(2, 20), default=3, show_default=True,
    help="Timed rounds (each quant once per round, in turns).",
)  # fmt: skip
@click.option("--threads", type=click.IntRange(1, 1024), help="Default: physical cores (what the engine uses).")
@click.option("--force", is_flag=True, help="Cache the result even when its repeats disagree (a busy machine).")
def calibrate(model: str, quants: str | None, repeats: int, threads: int | None, force: bool) -> None:
    """Time each quant on this CPU on MODEL's layer shape, in turns; `--auto-quant` and `runner plan` then use it.

    A result whose repeats disagree by more than 15 % is shown but not cached (the machine was busy)."""
    from tqdm import tqdm

    from planner import calibration
    from planner.hardware import usable_cores
    from planner.shapes import resolve_shape
    from quantize.errors import UnsteadyTiming
    from quantize.quants import SIZED
    from runner.calibrate import calibrate as run_calibrate
    from runner.calibrate import default_quants

    if quants is None:
        chosen = list(default_quants(calibration.cpu_identity(threads or usable_cores())))
    else:
        chosen = [q.strip().upper() for q in quants.split(",") if q.strip()]
    if unknown := [q for q in chosen if q not in SIZED]:
        raise BadInput(f"--quants {','.join(unknown)}: unknown quant; choose from {', '.join(SIZED)}")
    shape = resolve_shape(model)
    steps = 1 + sum(q != "F16" for q in chosen) + repeats  # write, quantize (BF16: write; not F16), then each round
    with tqdm(total=steps, file=sys.stderr, disable=not sys.stderr.isatty(), unit="step") as bar:

        def step(message: str) -> None:
            bar.set_description_str(message)
            bar.update(1)

        result = run_calibrate(shape, tuple(chosen), threads, repeats, progress=step)
    predicted = result.predict(shape)
    click.echo(f"{result.identity['cpu']}, {result.identity['threads']} threads, llama-cpp-python "
               f"{result.identity['llama_cpp_python']}: {shape.name}'s layer shape; {result.describe()}")  # fmt: skip
    timed, scaled = f"tok/s ({result.layers} layers)", f"predicted ({shape.layers} layers)"
    click.echo(f"  {'quant':<8}{timed:>22}{scaled:>26}{'spread':>8}")
    for q, tps in result.tokens_per_s.items():
        click.echo(f"  {q:<8}{tps:>22.1f}{predicted[q]:>26.1f}{result.spread[q]:>8.0%}")
    if not result.steady() and not force:
        worst = max(result.spread, key=result.spread.get)
        raise UnsteadyTiming(
            f"not cached: {worst}'s {repeats} repeats differ by {result.spread[worst]:.0%} (more than "
            f"{calibration.MAX_SPREAD:.0%}) under a load average of {result.load_average:.1f}, so the machine was "
            "busy and these speeds could rank the quants wrongly; run it again at a quieter moment (or more "
            "--repeats), or pass --force to cache it anyway"
        )
    click.echo(f"saved to {calibration.save(result)}")
