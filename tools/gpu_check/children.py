"""What the steps measure, each in its own process (`python -m tools.gpu_check child KIND ...`), so a CUDA
context, a crash or a timeout stays inside it. Each prints `result JSON` at the end (and `phase NAME` lines
where the peak memory is kept per phase: vram.run_child reads them)."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tools.gpu_check import SENTENCE, SMOLLM2_LAYERS


def emit(result: dict) -> None:
    print("result " + json.dumps(result), flush=True)


def child_ours(path: Path, n_texts: int, latency: bool) -> None:
    from runner.engine import Engine
    from runner.pipeline import Pipeline
    from tests.corpus import corpus

    texts = corpus(n_texts)
    with Engine(path, n_gpu_layers=999) as engine:
        pipeline = Pipeline(engine)
        tokens = pipeline.tokenize(texts).tokens
        pipeline.embed(texts[:32])  # warm-up: kernels loaded, context made
        t0 = time.perf_counter()
        pipeline.embed(texts)
        result: dict = {"speed": dict(texts=len(texts), tokens=tokens, seconds=time.perf_counter() - t0)}
        if latency:
            for _ in range(5):
                pipeline.embed([SENTENCE])
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                pipeline.embed([SENTENCE])
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            result["latency"] = dict(
                tokens=len(engine.tokenize(SENTENCE)),
                median_ms=statistics.median(times),
                p90_ms=times[int(0.9 * len(times))],
                runs=len(times),
            )
    emit(result)


def child_torch(n_texts: int, layers: int) -> None:
    """transformers' LlamaModel of the 8B shape, random bf16 weights made on the GPU, sdpa, bidirectional mask."""
    import torch
    from transformers import LlamaModel

    from tests.corpus import corpus
    from tests.hf_tokenizers import llama3_tokenizer_dir
    from tests.reference import hf_tokenizer
    from tests.synth import hf_config, llama3_shape

    config = hf_config("LlamaBidirectionalModel", layers=layers, **llama3_shape())
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tok = hf_tokenizer(llama3_tokenizer_dir(Path(tmp)))
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = corpus(n_texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [[texts[i] for i in order[b : b + 32]] for b in range(0, len(order), 32)]

    def forward(batch: list[str]) -> int:
        enc = tok(batch, padding=True, return_tensors="pt")
        keep = enc["attention_mask"].cuda().to(torch.bfloat16)
        mask = ((1.0 - keep[:, None, None, :]) * torch.finfo(torch.bfloat16).min).expand(-1, 1, keep.shape[1], -1)
        hidden = model(input_ids=enc["input_ids"].cuda(), attention_mask=mask).last_hidden_state
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        return int(enc["attention_mask"].sum())

    with torch.inference_mode():
        forward(batches[-1])  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = sum(forward(b) for b in batches)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    emit({"speed": dict(texts=len(texts), tokens=tokens, seconds=seconds), "attn": config._attn_implementation})


def child_smollm2(work: Path, n_texts: int) -> None:
    """SmolLM2's real weights (the pack's cut): float32 transformers on the GPU as the reference, ours per quant."""
    import numpy as np
    import torch
    from transformers import LlamaModel

    from quantize.convert import convert
    from quantize.ladder import quantize
    from runner.engine import Engine
    from runner.pipeline import Pipeline
    from tests.corpus import corpus
    from tests.real_models import smollm2_hf_dir
    from tests.reference import bidirectional_states, cosines, hf_tokenizer

    hf = work / "hf"
    if not (hf / "config.json").is_file():
        smollm2_hf_dir(hf)
    f16 = Path(convert(str(hf), work / "gguf", "f16", as_embedder=True))
    files = {"F16": f16, **dict(zip(["Q8_0", "Q4_K_M"], quantize(f16, ["Q8_0", "Q4_K_M"]), strict=True))}
    texts = corpus(n_texts)
    label = f"SmolLM2-135M real weights ({SMOLLM2_LAYERS}/30 layers)"

    model = LlamaModel.from_pretrained(hf, attn_implementation="sdpa").cuda().eval()
    tok = hf_tokenizer(hf)
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ref = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    tokens = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in range(0, len(order), 32):
        idx = order[b : b + 32]
        enc = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        keep = enc["attention_mask"].to(torch.float32).cuda()
        hidden = bidirectional_states(model, enc["input_ids"].cuda(), keep)
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        ref[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        tokens += int(enc["attention_mask"].sum())
    torch.cuda.synchronize()
    rows = [
        dict(
            model=label,
            backend="PyTorch float32, sdpa",
            texts=len(texts),
            tokens=tokens,
            seconds=time.perf_counter() - t0,
        )
    ]
    del model
    for quant, path in files.items():
        with Engine(path, n_gpu_layers=999) as engine:
            pipeline = Pipeline(engine)
            n = pipeline.tokenize(texts).tokens
            pipeline.embed(texts[:32])
            t0 = time.perf_counter()
            vectors = pipeline.embed(texts)
            seconds = time.perf_counter() - t0
        cos = cosines(vectors, ref)
        rows.append(
            dict(
                model=label,
                backend=f"ours {quant}",
                texts=len(texts),
                tokens=n,
                seconds=seconds,
                cos_mean=float(cos.mean()),
                cos_min=float(cos.min()),
            )
        )
    emit({"rows": rows})


def child_ballast(nbytes: int) -> None:
    """Hold NBYTES of GPU memory until stdin closes (or the parent kills it)."""
    import torch

    held = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    print("ready", flush=True)
    sys.stdin.read()
    del held


def child_vram(path: Path, gpu_layers: int, lengths: Sequence[int]) -> None:
    """In the child: load PATH with GPU_LAYERS, then per length make the context and decode one full sequence."""
    import numpy as np

    from planner.memory import Settings, needs
    from planner.shapes import file_quant, from_gguf
    from quantize.llamacpp import embeddings_only
    from runner.engine import Engine

    shape = from_gguf(path)
    quant = file_quant(path)
    rows = []
    print(f"phase {lengths[0]}", flush=True)  # loading the model counts to the first length's peak
    with Engine(path, n_gpu_layers=gpu_layers) as engine:
        for i, length in enumerate(lengths):
            if i:
                print(f"phase {length}", flush=True)
            engine.reserve(length)
            t0 = time.perf_counter()
            engine.embed_tokens([np.full(length, 1000, dtype=np.int32)])
            predicted = needs(shape, quant, Settings(length, embeddings_only()), (gpu_layers,))
            rows.append(
                dict(
                    quant=quant,
                    gpu_layers=gpu_layers,
                    layers=shape.layers,
                    max_length=length,
                    predicted_gpu=predicted.gpu_total,
                    predicted_ram=predicted.ram,
                    decode_s=time.perf_counter() - t0,
                )
            )
    emit({"rows": rows})


def child_files(workdir: Path, layers: int, quants: Sequence[str]) -> None:
    """The 8B-shaped GGUFs the measurements load (written while CUDA compiles)."""
    from tests.synth import model_files

    emit({q: str(p) for q, p in model_files(workdir, layers, quants).items()})
