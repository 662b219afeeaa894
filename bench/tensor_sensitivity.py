"""Which tensors a quant's loss comes from: raise one group of tensors at a time to a higher type and measure.

Command (from the repository root, with the project's venv active):

    python -m bench.tensor_sensitivity [--model SmolLM2-135M|MiniLM] [--quant Q4_K_M] [--to Q8_0] [--texts 200]
        [--groups classes,layers|none] [--band 3] [--pattern REGEX ...] [--no-imatrix] [--workdir DIR] [--markdown]

The base is --quant made with the F16 model's importance matrix (quantize.imatrix over the shipped calibration
set; --no-imatrix without). Each row quantizes the F16 file again with one group of tensors overridden to --to
(llama.cpp's tensor-type overrides, quantize.ladder's `tensor_types`): a tensor class in every layer
(`classes`: token_embd, attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down), every tensor of a
band of --band consecutive layers (`layers`), or the tensors a --pattern regex finds. The same `tests.corpus`
texts are embedded with F16, the base and each variant; a row gives the mean and min cosine to F16, the top-10
neighbour overlap, the bytes the group adds, and the share of the base's mean-cosine loss it removes, in all
and per added MiB: the groups worth keeping at a higher type come first.
Files are cached in --workdir (bench.retention's layout), variants in `<workdir>/sensitivity/`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.retention import embed, importance_of, log, neighbours, overlap, prepared
from quantize.ladder import quantize
from quantize.progress import Progress
from quantize.quants import QUANTS
from quantize.sizes import read_tensors
from tests.corpus import corpus

CLASSES = ["token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


@dataclass(frozen=True)
class Variant:
    group: str  # what was raised: a tensor class or a band of layers
    pattern: str  # the override's regex ("" for the base)
    mib: float
    mean_cos: float
    min_cos: float
    overlap: float


def groups(f16: Path, which: list[str], band: int) -> list[tuple[str, str]]:
    """(label, regex) per group, only groups that name at least one tensor of F16."""
    names = [t.name for t in read_tensors(f16)[0]]
    layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("blk.")})
    out = []
    if "classes" in which:
        out += [(c, rf"(^|\.){c}\.weight$") for c in CLASSES]
    if "layers" in which:
        for first in range(0, len(layers), band):
            ids = layers[first : first + band]
            out.append((f"layers {ids[0]}-{ids[-1]}", rf"^blk\.({'|'.join(map(str, ids))})\."))
    return [(label, rx) for label, rx in out if any(re.search(rx, n) for n in names)]


def variant(f16: Path, quant: str, to: str, label: str, pattern: str, importance, outdir: Path) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in label)
    dest = outdir / f"{quant}-{to}-{safe}.gguf"
    if not dest.is_file():
        made = quantize(f16, [quant], outdir / ".tmp", importance=importance, tensor_types=[(pattern, to)], stock=True)[
            0
        ]
        made.replace(dest)
    return dest


def measure(group: str, pattern: str, path: Path, texts: list[str], ref: np.ndarray, ref_nn: np.ndarray) -> Variant:
    vectors, _ = embed(path, texts)
    cos = np.sum(vectors * ref, axis=1)
    mib = path.stat().st_size / 2**20
    return Variant(group, pattern, mib, float(cos.mean()), float(cos.min()), overlap(ref_nn, neighbours(vectors)))


def table(base: Variant, rows: list[Variant], markdown: bool) -> str:
    header = ("Raised", "MiB", "+MiB", "Mean cos", "Min cos", "Top-10", "Loss removed", "per MiB")
    loss = 1 - base.mean_cos

    def cells(v: Variant) -> tuple[str, ...]:
        removed = (v.mean_cos - base.mean_cos) / loss if loss > 0 else 0.0
        extra = v.mib - base.mib
        per = f"{removed / extra:.1%}" if extra > 0.05 else "-"
        return (v.group, f"{v.mib:.1f}", f"{extra:+.1f}", f"{v.mean_cos:.5f}", f"{v.min_cos:.5f}", f"{v.overlap:.3f}",
                f"{removed:.1%}", per)  # fmt: skip

    ranked = sorted(rows, key=lambda v: -(v.mean_cos - base.mean_cos) / max(v.mib - base.mib, 0.05))
    lines = [cells(base), *(cells(v) for v in ranked)]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * (len(header) - 1)]
        return "\n".join(out + ["| " + " | ".join(c.replace("|", "\\|") for c in x) + " |" for x in lines])
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    aligned = [[c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths, strict=True))]
               for x in [header, *lines]]  # fmt: skip
    return "\n".join("  ".join(x) for x in aligned)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tensor_sensitivity", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["SmolLM2-135M", "MiniLM"], default="SmolLM2-135M")
    p.add_argument("--quant", default="Q4_K_M", choices=QUANTS)
    p.add_argument("--to", default="Q8_0", help="the type a raised group gets (a ggml type: Q8_0, Q6_K, F16 ...)")
    p.add_argument("--texts", type=int, default=200)
    p.add_argument("--groups", default="classes,layers")
    p.add_argument("--band", type=int, default=3, help="layers per band in the `layers` groups")
    p.add_argument("--pattern", action="append", default=[], help="a group of its own: a regex (repeatable)")
    p.add_argument("--no-imatrix", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "retention")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if set(args.groups) - {"classes", "layers", "none"}:
        p.error("--groups takes classes and/or layers, or none (only --pattern)")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    f16 = prepared(args.model, args.workdir)
    workdir = f16.parent.parent
    texts = corpus(args.texts)
    importance = None if args.no_imatrix else importance_of(f16, texts)
    outdir = workdir / "sensitivity" / ("plain" if args.no_imatrix else "imatrix")
    outdir.mkdir(parents=True, exist_ok=True)
    base_path = outdir / f"{args.quant}-base.gguf"
    if not base_path.is_file():
        say = Progress(say=log)
        quantize(f16, [args.quant], outdir / ".tmp", progress=say, importance=importance, stock=True)[0].replace(
            base_path
        )
    ref, _ = embed(f16, texts)
    ref_nn = neighbours(ref)
    base = measure(f"{args.quant} (base)", "", base_path, texts, ref, ref_nn)
    log(f"base: mean cos {base.mean_cos:.5f}, {base.mib:.1f} MiB")
    rows = []
    for label, pattern in groups(f16, args.groups, args.band) + [(rx, rx) for rx in args.pattern]:
        path = variant(f16, args.quant, args.to.upper(), label, pattern, importance, outdir)
        rows.append(measure(label, pattern, path, texts, ref, ref_nn))
        log(f"{label}: mean cos {rows[-1].mean_cos:.5f}, {rows[-1].mib:.1f} MiB")
    print(table(base, rows, args.markdown))
    imatrix_note = "without an importance matrix" if args.no_imatrix else "with the F16 model's importance matrix"
    print(
        f"\n`{shlex.join(['python', '-m', 'bench.tensor_sensitivity', *argv])}` — {args.model}, {len(texts)} texts, "
        f"{args.quant} {imatrix_note}; each row raises one group to {args.to.upper()}; cosines against F16."
    )
    log(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
