"""What the LM head costs an embedder: Qwen3-Embedding-8B's layer with its real 151,665-token vocabulary, timed
with and without the head on the same engine, in turns, and the buffers llama.cpp reserves either way.

    python -m bench.lm_head [--layers 1] [--quant Q4_K_M] [--tokens 256] [--repeats 3] [--lengths 512,4096]

Needs the engine scripts/install builds (scripts/engine-patches/embeddings-only.patch): with embeddings_only
off the same library does what a stock llama.cpp does (LM head on every token, logits reserved). Writes a
synthetic GGUF (random weights: speed does not depend on their values) of LAYERS layers of the model's shape,
quantizes it with llama.cpp's quantizer, times decodes of TOKENS tokens (median of REPEATS after a warm-up),
and extrapolates to the model's 36 layers: the head's time is the same whatever the depth.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from planner.batching import MIN_TOKEN_BUDGET
from planner.hardware import usable_cores
from planner.memory import Settings, needs
from planner.shapes import ModelShape, from_gguf, resolve_shape
from quantize import llamacpp
from quantize.architectures.qwen import Qwen3
from quantize.ladder import quantize
from runner.engine import Engine

MODEL = "qwen3-embedding-8b"
MIB = 2**20
SEQS = 4  # sequences per micro-batch, as in runner calibrate


def synthetic_qwen3(path: Path, shape: ModelShape, layers: int) -> Path:
    """An F16 qwen3 GGUF with SHAPE's layer and vocabulary size, LAYERS deep, random weights, last-token pooling."""
    config = {
        "architectures": ["Qwen3Model"],
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.context,
    }
    family = Qwen3(config, "lm-head bench")
    family.causal = True  # as Qwen3-Embedding runs
    # An SPM vocabulary llama.cpp loads (<unk> <s> </s>, the 256 byte tokens), filled to the model's size.
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [f"t{i}" for i in range(shape.vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (shape.vocab - len(types))
    block = (np.random.default_rng(0).standard_normal(1 << 16) * 0.02).astype(np.float16)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[family.gguf_arch])
    w.add_name("lm-head bench")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    family.write_hparams(w)
    w.add_pooling_type(gguf.PoolingType.LAST)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * shape.vocab)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for spec in family.tensor_specs():
        if spec.type == gguf.GGMLQuantizationType.F32:
            w.add_tensor(spec.name, np.ones(spec.shape, dtype=np.float32))
        else:
            w.add_tensor(spec.name, np.resize(block, int(np.prod(spec.shape))).reshape(spec.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@contextlib.contextmanager
def engine_mode(embeddings_only: bool) -> Iterator[None]:
    """Engines opened inside run with embeddings_only as given (off: what a stock llama.cpp does)."""
    detected = llamacpp.embeddings_only
    llamacpp.embeddings_only = lambda: embeddings_only
    try:
        yield
    finally:
        llamacpp.embeddings_only = detected


def buffers(path: Path, length: int, embeddings_only: bool) -> tuple[float, float, float, float]:
    """(llama.cpp's compute, planner's compute, llama.cpp's output at creation, planner's) in MiB at LENGTH."""
    shape, s = from_gguf(path), Settings(length, embeddings_only)
    with engine_mode(embeddings_only), Engine(path) as engine:
        engine.reserve(length)
        got = llamacpp.buffer_sizes()
    at_creation = 4 * s.n_seq * (shape.hidden + (0 if embeddings_only else shape.vocab))
    return got["CPU compute"], needs(shape, "F16", s).cpu.compute / MIB, got["CPU output"], at_creation / MIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--tokens", type=int, default=256, help="tokens per timed decode (at most 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lengths", default="512,4096", help="context lengths whose buffers are compared")
    args = p.parse_args()
    llamacpp.init()
    if not llamacpp.embeddings_only():
        raise SystemExit("bench.lm_head needs the engine scripts/install builds (stock llama-cpp-python found)")
    shape = resolve_shape(MODEL)
    threads = usable_cores()
    rng = np.random.default_rng(1)
    length = min(args.tokens, MIN_TOKEN_BUDGET) // SEQS
    seqs = [rng.integers(3, shape.vocab, length, dtype=np.int32) for _ in range(SEQS)]
    with tempfile.TemporaryDirectory(prefix="lm-head-") as tmp:
        start = time.perf_counter()
        f16 = synthetic_qwen3(Path(tmp) / "lm-head-F16.gguf", shape, args.layers)
        path = f16 if args.quant == "F16" else quantize(f16, [args.quant], threads=threads)[0]
        made = time.perf_counter() - start

        print(f"{MODEL}'s layer x {args.layers}, vocabulary {shape.vocab:,}, {args.quant}, {threads} threads")
        print("\n| n_ubatch | engine | compute: llama.cpp | planner | output at creation: llama.cpp / planner |")
        print("|---:|:---|---:|---:|---:|")
        for length in (int(x) for x in args.lengths.split(",")):
            for only, label in ((False, "LM head, logits (stock)"), (True, "embeddings_only")):
                got, want, out, out_want = buffers(path, length, only)
                print(f"| {length} | {label} | {got:,.1f} MiB | {want:,.1f} MiB | {out:,.1f} / {out_want:,.1f} MiB |")

        times: dict[bool, list[float]] = {False: [], True: []}
        engines = {}
        for only in (False, True):
            with engine_mode(only):  # the flag is read when the context is made
                engines[only] = Engine(path, threads)
                engines[only].reserve(MIN_TOKEN_BUDGET)
        with engines[False], engines[True]:
            for engine in engines.values():
                engine.embed_tokens(seqs)  # warm-up: page-in, repacking
            for _ in range(args.repeats):  # in turns: a busy machine slows both alike
                for only, engine in engines.items():
                    begin = time.perf_counter()
                    engine.embed_tokens(seqs)
                    times[only].append(time.perf_counter() - begin)
    tokens = sum(len(s) for s in seqs)
    t_with, t_without = (float(np.median(times[only])) for only in (False, True))
    t_head = t_with - t_without
    full_without = tokens / (t_without * shape.layers / args.layers)
    full_with = tokens / (t_without * shape.layers / args.layers + t_head)
    print(f"\n{tokens} tokens per decode, median of {args.repeats} turns (synthetic file made in {made:.0f} s):\n")
    print("| | with the LM head | without | LM head share |\n|:---|---:|---:|---:|")
    print(
        f"| {args.layers} layer(s), measured | {tokens / t_with:.1f} tok/s | {tokens / t_without:.1f} tok/s "
        f"| {t_head / t_with:.1%} |"
    )
    print(
        f"| {shape.layers} layers, extrapolated | {full_with:.1f} tok/s | {full_without:.1f} tok/s "
        f"| {1 - full_with / full_without:.1%} |"
    )


if __name__ == "__main__":
    main()
