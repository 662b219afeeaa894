"""`runner calibrate`: time each quant's kernels on this CPU, on a model's own layer shape, and cache it.

Writes a synthetic GGUF of CALIBRATED_LAYERS layers of the model's shape (random F16 weights written
directly with gguf-py, the family class's own tensor layout, a 259-token vocabulary so the embedding
table is tiny), quantizes it with llama.cpp's quantizer (BF16, an unquantized type llama.cpp's quantizer would
only reach through a lossy F16 detour, is written directly the same way), then times the engine on full micro-batches of
token ids for each quant, every file loaded and warmed up first, then REPEATS rounds in turns (F16, Q8_0, ...,
F16, Q8_0, ...), so that load which comes and goes on a shared machine falls on every quant alike: the median
per quant, and how far its repeats disagree (`runner calibrate` refuses to cache a result past
planner.calibration.MAX_SPREAD). Weights' values do not change kernel speed, and a model's speed scales with its
layer count (planner/calibration.py predicts from it).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import gguf
import numpy as np

from planner.batching import MIN_TOKEN_BUDGET
from planner.calibration import CALIBRATED_LAYERS, Calibration, cpu_identity, has_bf16_units, layer_shape
from planner.hardware import usable_cores
from planner.shapes import ModelShape
from quantize import imatrix
from quantize.architectures.llama import Llama
from quantize.convert import OUTTYPES
from quantize.ladder import quantize
from quantize.quants import IQUANTS
from runner.engine import Engine

# What the preferences choose among (F16 .. Q4_K_M, and IQ4_XS once a file of it is measured on the model); the
# rest can be asked for with --quants. IQ4_XS is made here with a uniform importance matrix: its kernels' speed
# does not depend on the weights' values. BF16 joins them where the CPU has BF16 units (default_quants).
DEFAULT_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "IQ4_XS")
SEQS = 4  # sequences per micro-batch, as packed texts of ~128 tokens
VOCAB = 3 + 256  # <unk> <s> </s> and the 256 byte tokens: an SPM vocabulary llama.cpp loads


def default_quants(identity: dict[str, object]) -> tuple[str, ...]:
    """What `runner calibrate` times on the CPU IDENTITY describes (planner.calibration.cpu_identity): DEFAULT_QUANTS,
    and BF16 after F16 where the CPU has BF16 units (elsewhere llama.cpp runs BF16 too, slower: --quants BF16)."""
    return ("F16", "BF16", *DEFAULT_QUANTS[1:]) if has_bf16_units(identity) else DEFAULT_QUANTS


def synthetic_gguf(path: Path, shape: ModelShape, layers: int = CALIBRATED_LAYERS, outtype: str = "F16") -> Path:
    """An F16 (or BF16, OUTTYPE) llama-embed GGUF with SHAPE's layer (hidden, FFN, heads, KV heads), LAYERS deep,
    random weights."""
    config = {
        "architectures": ["LlamaModel"],
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
    }
    family = Llama(config, "calibration")
    ftype, qtype = OUTTYPES[outtype.lower()]
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(1 << 16) * 0.02).astype(np.float32)  # tiled: speed does not care for values
    # gguf-py writes BF16 as raw 16-bit words (its rounding of the float32 values); F16 as numpy's float16.
    bf16 = qtype == gguf.GGMLQuantizationType.BF16
    block = gguf.quants.quantize(values, qtype).view(np.uint16) if bf16 else values.astype(np.float16)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[family.gguf_arch])
    w.add_name("calibration")
    w.add_file_type(ftype)
    family.write_hparams(w)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    )
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for spec in family.tensor_specs():
        n = int(np.prod(spec.shape))
        if spec.type == gguf.GGMLQuantizationType.F32:
            w.add_tensor(spec.name, np.ones(spec.shape, dtype=np.float32))
        else:
            w.add_tensor(spec.name, np.resize(block, n).reshape(spec.shape), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def calibration_batch() -> list[np.ndarray]:
    """SEQS random sequences filling the smallest token budget: one full micro-batch, what is timed."""
    rng = np.random.default_rng(1)
    return [rng.integers(3, VOCAB, MIN_TOKEN_BUDGET // SEQS, dtype=np.int32) for _ in range(SEQS)]


def median_rate(engine: Engine, seqs: list[np.ndarray], repeats: int) -> float:
    """Tokens/s of SEQS on ENGINE: a warm-up (context, page-in, repacking), then the median of REPEATS runs."""
    engine.embed_tokens(seqs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.embed_tokens(seqs)
        times.append(time.perf_counter() - start)
    return sum(len(s) for s in seqs) / statistics.median(times)


def _timed_run(engine: Engine) -> Callable[[], int]:
    """What one turn of ENGINE runs: a full micro-batch of calibration_batch(), after one warm-up (context, page-in,
    repacking); it returns the tokens embedded."""
    seqs = calibration_batch()
    engine.embed_tokens(seqs)

    def run() -> int:
        engine.embed_tokens(seqs)
        return sum(len(s) for s in seqs)

    return run


def in_turns(
    runs: dict[str, Callable[[], int]],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    after_turn: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Tokens/s of each run, REPEATS times, taken in turns (A B C, A B C, ...) so that load which comes and goes
    on a shared machine falls on every quant alike. Each run returns the tokens it embedded; AFTER_TURN is called
    after each round."""
    rates: dict[str, list[float]] = {quant: [] for quant in runs}
    for _ in range(repeats):
        for quant, run in runs.items():
            start = clock()
            tokens = run()
            rates[quant].append(tokens / max(clock() - start, 1e-9))
        after_turn()
    return rates


def spread(rates: list[float]) -> float:
    """How far repeats disagree: (fastest - slowest) / median."""
    return (max(rates) - min(rates)) / statistics.median(rates)


def calibrate(
    shape: ModelShape,
    quants: tuple[str, ...] | None = None,
    threads: int | None = None,
    repeats: int = 3,
    progress: Callable[[str], None] = lambda _: None,
    clock: Callable[[], float] = time.perf_counter,
) -> Calibration:
    """Tokens/s of each of QUANTS over CALIBRATED_LAYERS layers of SHAPE's layer on this CPU: every file loaded and
    warmed up, then REPEATS rounds in turns; the median per quant, how far its repeats disagree, when, and the
    highest load average seen; QUANTS None: default_quants for this CPU. Whether to trust it (Calibration.steady) is
    the caller's decision."""
    threads = threads or usable_cores()
    quants = quants or default_quants(cpu_identity(threads))
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp, contextlib.ExitStack() as stack:
        progress(f"writing {CALIBRATED_LAYERS} layers of {shape.name}'s shape")
        f16 = synthetic_gguf(Path(tmp) / "calibration-F16.gguf", shape)
        runs: dict[str, Callable[[], int]] = {}
        for quant in quants:
            if quant == "F16":
                path = f16
            elif quant == "BF16":
                progress("writing BF16")
                path = synthetic_gguf(Path(tmp) / "calibration-BF16.gguf", shape, outtype="BF16")
            else:
                progress(f"quantizing {quant}")
                weights = imatrix.uniform(f16) if quant in IQUANTS else None
                path = quantize(f16, [quant], threads=threads, importance=weights)[0]
            runs[quant] = _timed_run(stack.enter_context(Engine(path, threads)))
        measured_at = datetime.now().astimezone().isoformat(timespec="seconds")
        load = [os.getloadavg()[0]]

        def after_turn() -> None:
            load.append(os.getloadavg()[0])
            progress("timed a round")

        rates = in_turns(runs, repeats, clock, after_turn)
    return Calibration(
        cpu_identity(threads),
        layer_shape(shape),
        CALIBRATED_LAYERS,
        {q: statistics.median(r) for q, r in rates.items()},
        {q: spread(r) for q, r in rates.items()},
        measured_at,
        max(load),
    )
