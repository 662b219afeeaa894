"""Find the GGUF file behind `-m` (quantize.reference.ModelRef), producing it when missing, and the prompts that go
with it.

One model name, one file: the quant a model's runs use is pinned in its directory's manifest.json once it is
chosen (by --quant, by --auto-quant or by the first run), and every front door (runner embed, Embedder, runner
serve, runner embed-dataset) resolves through here, so all of them use that file until --quant picks another. A
plan (--auto-quant, a calibration, another machine) never moves a pin: it says what it would pick instead. A GGUF
file is its own pin.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import gguf

from planner import HardwareOptions, disk, plan_for
from planner.hardware import NO_OFFLOAD
from planner.policy import Plan
from quantize import gguf_keys
from quantize.convert import convert, made_from, output_path, run_outtype
from quantize.errors import BadInput, ModelNotFound, UserError
from quantize.files import models_home
from quantize.gguf_check import check_gguf
from quantize.ladder import quantize
from quantize.manifest import content_sha256, pin, pinned, read_metadata, recorded_sha256
from quantize.progress import SILENT, Progress, size
from quantize.quants import LADDER, PLANNED, PREFERENCE
from quantize.reference import Kind, ModelRef
from quantize.source import Source, resolve
from quantize.store import base_file, on_disk, remove, serves, usable

log = logging.getLogger("runner")

_PLACEHOLDER = re.compile(r"\{(task|text)\}")


@dataclass(frozen=True)
class Prompts:
    query: str
    document: str
    default_task: str | None

    @staticmethod
    def plain() -> Prompts:
        """No template: what a GGUF without prompt metadata gets."""
        return Prompts("{text}", "{text}", None)

    def apply(self, text: str, query: bool, task: str | None, where: str) -> str:
        """The template with `{task}` and `{text}` put in literally, in one pass (a task holding "{text}" stays
        as it is). Never str.format: templates come from the GGUF, and format specs in them are code."""
        template = self.query if query else self.document
        values = {"text": text}
        if query and "{task}" in template:
            task = task or self.default_task
            if not task:
                raise BadInput(f"{where}: --query needs --task (this model has no default task)")
            values["task"] = task
        return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), template)

    def instruction(self, query: bool, task: str | None, where: str) -> str:
        """The text the template puts before the input (NV-Embed's `instruction`), e.g. 'Instruct: ...\\nQuery: '."""
        template = self.query if query else self.document
        if not template.endswith("{text}"):
            raise BadInput(f"{where}: prompt {template!r} must end with {{text}} for a model that pools past it")
        return self.apply("", query, task, where)


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    prompts: Prompts
    max_length: int | None
    license_note: str | None
    name: str  # the registry name, else the file's stem without its quant (all-minilm-l6-v2 for ...-Q6_K.gguf)
    quant: str | None = None  # the file's quant (F16, Q6_K, ...); None: not one llama.cpp names
    pooling: str | None = None  # mean, cls, last, latent-attention (the GGUF's own)

    @staticmethod
    def of_file(path: Path, prompts: Prompts | None = None) -> ResolvedModel:
        """A GGUF taken as it is, with PROMPTS (default: none) and no registry entry (benches, tests)."""
        path = Path(path)
        meta = read_metadata(path)
        quant = file_quant(path, meta)
        return ResolvedModel(
            path, prompts or Prompts.plain(), None, None, _stem_name(path, quant), quant, meta.get(gguf_keys.POOLING)
        )

    @property
    def tag(self) -> str:
        """The model as the server names it, Ollama's name:tag with the quant as the tag (all-minilm-l6-v2:Q6_K)."""
        return f"{self.name}:{self.quant}" if self.quant else self.name

    def identity(self) -> dict[str, str | None]:
        """What names this model file in every output (a sidecar, parquet metadata, a dataset's run record): its
        name, quant, file name and sha256 (manifest.json's while the file is the one recorded: an 8B file is not
        hashed each run)."""
        return {"model": self.name, "quant": self.quant, "file": self.path.name, "sha256": content_sha256(self.path)}


def file_quant(path: Path, meta: dict[str, object]) -> str | None:
    """PATH's quant: general.file_type as llama.cpp names it (MOSTLY_Q6_K -> Q6_K), else the quant its
    `<name>-<QUANT>.gguf` name says, else None."""
    try:
        return gguf.LlamaFileType(int(meta["general.file_type"])).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (KeyError, TypeError, ValueError):
        tag = path.stem.rsplit("-", 1)[-1].upper()
        return tag if tag in PREFERENCE else None


def _stem_name(path: Path, quant: str | None) -> str:
    """A model's name from its file's: the stem without a trailing -QUANT."""
    head, _, tag = path.stem.rpartition("-")
    return head if head and quant and tag.upper() == quant else path.stem


def model_directory(ref: ModelRef) -> Path | None:
    """Where MODEL's GGUF files are looked for and made, whose manifest.json holds its pin: a model directory as
    it is, else its folder in the models home (a registry name's, a converted checkpoint's or hub repo's); None
    for a GGUF file, its own pin."""
    if ref.kind is Kind.GGUF:
        return None
    if ref.kind is Kind.STORE:
        return ref.path
    if ref.kind is Kind.REGISTRY:
        return ref.home
    src = resolve(str(ref.path)) if ref.kind is Kind.CHECKPOINT else Source(Path(ref.text), ref.repo)
    return output_path(src, None, "f16").parent


def pin_of(ref: ModelRef) -> dict | None:
    """MODEL's pin ({"quant", "file", "sha256"} in its directory's manifest.json), or None: none yet, or a GGUF file."""
    directory = model_directory(ref)
    return pinned(directory) if directory is not None and directory.is_dir() else None


def plan_run(
    model: str | ModelRef,
    quant: str | None = None,
    max_length: int | None = None,
    hardware: HardwareOptions | None = None,
    progress: Progress = SILENT,
    for_run: bool = True,
) -> Plan:
    """--auto-quant's plan for MODEL: QUANT's placement when asked for; else, for a pinned model, the pinned
    quant's placement; else the planner's choice (which the run then pins). When the planner would now pick
    another quant than the pin (after a calibration, on another machine), PROGRESS says so and how to move the
    pin, and the plan's reason names the pin. A pin to a type the planner does not size (F32, an i-quant) is
    refused FOR_RUN; `runner plan` (not for_run) shows the planner's table with a reason naming the pin."""
    ref = ModelRef.parse(model)
    planned = plan_for(ref, quant, max_length, hardware)
    held = pin_of(ref) if quant is None else None
    if held is None or planned.chosen.quant == held["quant"]:
        return planned
    other = planned.chosen.quant
    if held["quant"] not in PLANNED:
        if not for_run:
            return replace(
                planned,
                reason=f"{planned.reason}; but runs use the pinned {held['quant']} ({held['file']}), a type the "
                f"planner does not size: --quant {other} moves the pin",
            )
        raise BadInput(
            f"{ref}: pinned to {held['quant']} ({held['file']}), a type the planner does not size; run without "
            f"--auto-quant to use it, or --quant {other} to move the pin to what the plan picks"
        )
    progress.say(
        f"pinned {held['quant']} ({held['file']}) kept; the plan for this machine picks {other} ({planned.reason}): "
        f"--quant {other} moves the pin"
    )
    kept = plan_for(ref, held["quant"], max_length, hardware)
    reason = f"the pinned quant (the plan picks {other}; --quant {other} moves the pin)"
    if NO_OFFLOAD in kept.reason:  # a CPU-only build: the way to a GPU plan still shows
        reason += f"; {NO_OFFLOAD}"
    return replace(kept, reason=reason)


def resolve_model(
    model: str | ModelRef,
    quant: str | None = None,
    keep_f16: bool = True,
    progress: Progress | None = None,
    plan: Plan | None = None,
) -> ResolvedModel:
    """MODEL (quantize.reference.ModelRef) as a checked GGUF on disk, produced first when missing.

    Every front door resolves here, so none skips the disk check or the progress display: the disk plan
    (PLAN's, else planner.disk.for_run's) refuses a run the filesystem cannot hold before its first byte, and
    PROGRESS (default: a summary line per step on stderr, bars on a terminal; SILENT for none) shows each step
    that runs: download, conversion, quantization. With PLAN its chosen quant is the one used (a GGUF file runs
    as it is). An HF checkpoint is converted once and reused while its files are unchanged; a missing quant is
    made from the F16 file, which is then kept (the source of every other quant) unless KEEP_F16 is False.
    """
    ref = ModelRef.parse(model)
    progress = Progress.stderr() if progress is None else progress
    if plan is not None:
        quant = None if ref.kind is Kind.GGUF else plan.chosen.quant
    if quant and ref.kind is Kind.GGUF:
        raise BadInput(f"{ref}: --quant picks a file inside a model directory; pass the directory instead")
    held = pin_of(ref)
    quant = quant.upper() if quant else (held["quant"] if held else None)
    (plan.disk if plan is not None and plan.disk else disk.for_run(ref, quant)).check()
    try:
        if ref.kind is Kind.GGUF:
            gguf_path = ref.path
        elif ref.kind is Kind.STORE:
            gguf_path = _pick(ref.path, quant, keep_f16, progress)
        elif ref.kind is Kind.REGISTRY and serves(on_disk(ref.home), quant):
            # What is on disk serves, unless neither the quant nor an F16 to make it from is there (--no-keep-f16).
            gguf_path = _pick(ref.home, quant, keep_f16, progress)
        else:
            gguf_path = _from_checkpoint(ref, quant, keep_f16, progress)
    except ModelNotFound as e:
        if held is None or quant != held["quant"]:
            raise
        raise ModelNotFound(f"{e}; {ref} is pinned to {quant}: --quant QUANT pins another") from None
    if ref.kind is not Kind.GGUF:
        _pin(gguf_path, held, progress)
    entry = ref.entry
    # Checked before anything trusts it: hyper-parameters against the tensors, prompt templates, head file name.
    meta = check_gguf(gguf_path).metadata
    prompts = Prompts(
        query=str(meta.get(gguf_keys.QUERY_PROMPT) or (entry.query_prompt if entry else "{text}")),
        document=str(meta.get(gguf_keys.DOCUMENT_PROMPT) or (entry.document_prompt if entry else "{text}")),
        default_task=meta.get(gguf_keys.DEFAULT_TASK) or (entry.default_task if entry else None),
    )
    max_length = meta.get(gguf_keys.MAX_LENGTH) or (entry.max_length if entry else None)
    note = meta.get(gguf_keys.LICENSE_NOTE) or (entry.license_note if entry else None)
    file_type = file_quant(gguf_path, meta)
    name = entry.name if entry else _stem_name(gguf_path, file_type)
    length = int(max_length) if max_length else None
    return ResolvedModel(gguf_path, prompts, length, note, name, file_type, meta.get(gguf_keys.POOLING))


def _pin(path: Path, held: dict | None, progress: Progress) -> None:
    """Pin PATH, the file this run uses, in its directory's manifest.json, saying so when the pin is new
    or moves (HELD: the pin before), and when the pinned quant's file was made again (another conversion: other
    vectors). A directory that cannot be written keeps no pin (a warning says so)."""
    quant = next((q for q, p in on_disk(path.parent).items() if p.name == path.name), None)
    if quant is None:
        return  # not a <name>-<QUANT>.gguf file the store knows: nothing a later run could find by its quant
    digest = recorded_sha256(path)
    if held is not None and held["quant"] == quant and held["file"] == path.name:
        if held["sha256"] == digest or digest is None:
            return
        if held["sha256"] is not None:
            progress.say(
                f"pinned {quant} ({path.name}) was made again (sha256 {held['sha256'][:12]} -> {digest[:12]}): "
                "vectors made before differ from this run's"
            )
    elif held is None:
        progress.say(f"pinned {quant} ({path.name}): runs of this model use it until --quant picks another")
    else:
        progress.say(
            f"pin moved from {held['quant']} ({held['file']}) to {quant} ({path.name}): runs without --quant use it now"
        )
    try:
        pin(path.parent, quant, path.name, digest)
    except (OSError, UserError) as e:
        log.warning("%s: cannot pin %s (%s); runs pick the highest fidelity on disk", path.parent, quant, e)


def _pick(
    directory: Path, quant: str | None, keep_f16: bool = True, progress: Progress = SILENT, base: Path | None = None
) -> Path:
    """QUANT's file in DIRECTORY (default: the highest fidelity there), made from BASE (default: the unquantized
    file there, F16 or BF16) when missing or when it was made from another conversion."""
    files = on_disk(directory)
    if not files:
        raise ModelNotFound(f"{directory}: no <name>-<QUANT>.gguf files here; run `runner convert` first")
    if quant is None:
        return files[min(files, key=PREFERENCE.index)]
    quant = quant.upper()
    if (path := usable(files, quant, base)) is not None:
        return path
    base = base or base_file(files)
    if base is None or quant not in LADDER:
        raise ModelNotFound(f"{directory}: no {quant} file and nothing to make it from; have {', '.join(files)}")
    made = quantize(base, [quant], progress=progress)[0]
    from runner.retention import after_quantize  # runs the engine: loaded only when a quant is made

    after_quantize(made, progress=progress)  # measured now when quick, else it says how
    held = size(base.stat().st_size)
    if keep_f16:
        name = directory.name if directory.parent == models_home() else str(directory)
        progress.say(
            f"kept {base.name} ({held}), the source of every other quant; free it with --no-keep-f16 next time "
            f"or `runner rm {name} --quant {base.stem.rsplit('-', 1)[-1]}`"
        )
    else:
        remove(directory, [base.stem.rsplit("-", 1)[-1].upper()])
        progress.say(f"removed {base.name} ({held}, --no-keep-f16); another quant will need a new conversion")
    return made


def _from_checkpoint(ref: ModelRef, quant: str | None, keep_f16: bool, progress: Progress) -> Path:
    """An HF checkpoint, a registry model or a hub repo, converted (once) into the models home."""
    source = str(ref.path) if ref.kind is Kind.CHECKPOINT else ref.text
    local = resolve(source) if ref.kind is Kind.CHECKPOINT else None
    if quant and local is not None and (done := made_from(local, quant)) is not None:
        return done  # a local checkpoint's quant made from these very files (its F16 may be gone: --no-keep-f16)
    # F16, or BF16 where the plan picked it (reused when this source was converted before and has not changed).
    base = convert(source, outtype=run_outtype(local, quant), progress=progress)
    return _pick(base.parent, quant or "F16", keep_f16, progress, base)
