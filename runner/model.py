"""Find the GGUF file behind `-m` (quantize.reference.ModelRef), producing it when missing, and the prompts that go
with it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from planner import disk
from planner.policy import Plan
from quantize import gguf_keys
from quantize.convert import convert, made_from
from quantize.errors import BadInput, ModelNotFound
from quantize.files import models_home
from quantize.gguf_check import check_gguf
from quantize.ladder import quantize
from quantize.progress import SILENT, Progress, size
from quantize.quants import LADDER, PREFERENCE
from quantize.reference import Kind, ModelRef
from quantize.source import resolve
from quantize.store import base_file, on_disk, remove, serves, usable

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
    name: str  # the registry name, else the file's stem

    @staticmethod
    def of_file(path: Path, prompts: Prompts | None = None) -> ResolvedModel:
        """A GGUF taken as it is, with PROMPTS (default: none) and no registry entry (benches, tests)."""
        return ResolvedModel(Path(path), prompts or Prompts.plain(), None, None, Path(path).stem)


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
    (plan.disk if plan is not None and plan.disk else disk.for_run(ref, quant)).check()
    if ref.kind is Kind.GGUF:
        gguf_path = ref.path
    elif ref.kind is Kind.STORE:
        gguf_path = _pick(ref.path, quant, keep_f16, progress)
    elif ref.kind is Kind.REGISTRY and serves(on_disk(ref.home), quant):
        # What is on disk serves, unless neither the quant nor an F16 to make it from is there (--no-keep-f16).
        gguf_path = _pick(ref.home, quant, keep_f16, progress)
    else:
        gguf_path = _from_checkpoint(ref, quant, keep_f16, progress)
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
    name = entry.name if entry else gguf_path.stem
    return ResolvedModel(gguf_path, prompts, int(max_length) if max_length else None, note, name)


def _pick(directory: Path, quant: str | None, keep_f16: bool = True, progress: Progress = SILENT) -> Path:
    """QUANT's file in DIRECTORY (default: the highest fidelity there), made from the F16 when missing or
    when it was made from an older conversion than the F16 beside it."""
    files = on_disk(directory)
    if not files:
        raise ModelNotFound(f"{directory}: no <name>-<QUANT>.gguf files here; run `runner convert` first")
    if quant is None:
        return files[min(files, key=PREFERENCE.index)]
    quant = quant.upper()
    if (path := usable(files, quant)) is not None:
        return path
    base = base_file(files)
    if base is None or quant not in LADDER:
        raise ModelNotFound(f"{directory}: no {quant} file and nothing to make it from; have {', '.join(files)}")
    made = quantize(base, [quant], progress=progress)[0]
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
    if quant and ref.kind is Kind.CHECKPOINT and (done := made_from(resolve(source), quant)) is not None:
        return done  # a local checkpoint's quant made from these very files (its F16 may be gone: --no-keep-f16)
    f16 = convert(source, progress=progress)  # reused when this source was converted before and has not changed
    return _pick(f16.parent, quant or "F16", keep_f16, progress)
