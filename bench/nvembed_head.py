"""NV-Embed-v2's latent-attention head: its share of CPU embedding time at Q8_0, and the fold's cost.

The full 7B trunk (32 layers) does not fit the time these machines have, so the trunk is timed at two
depths of the real Mistral-7B layer shape (hidden 4096, FFN 14336, 32/8 heads; random weights, Q8_0)
and extrapolated linearly to 32 layers: t(32) = t(a) + (32 - a) * (t(b) - t(a)) / (b - a). The head is
the real NV-Embed-v2 shape (8 heads x 4096, 512 latents, GEGLU 4 x 4096), random, folded by the converter
and timed on the same token count. Run from the repository root:

    python -m bench.nvembed_head [--texts 32] [--depths 2,4] [--workdir DIR]

Prints one table: seconds for each trunk depth, the extrapolated 32-layer trunk, the head, and the
head's share of (trunk + head). Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from quantize.architectures.nvembed import HEAD, HEAD_TENSORS, NVEmbed
from quantize.convert import convert, write_head
from quantize.ladder import quant_path, quantize
from quantize.progress import Progress
from runner.engine import Engine
from runner.latent_attention import LatentAttentionHead
from tests.corpus import corpus
from tests.synth import llama3_checkpoint

HIDDEN, FFN, LAYERS = 4096, 14336, 32
MISTRAL_VOCAB = 32000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trunk_q8(workdir: Path, depth: int) -> Path:
    """A Q8_0 llama-embed GGUF of DEPTH Mistral-7B-shaped layers (cached in WORKDIR)."""
    out = workdir / f"trunk-{depth}"
    q8 = quant_path(out / f"ckpt-{depth}-F16.gguf", "Q8_0")
    if q8.is_file():
        return q8
    ckpt = out / f"ckpt-{depth}"
    if not (ckpt / "config.json").is_file():
        # Llama-3's tokenizer carries the vocabulary; the embedding lookup's size barely matters to speed.
        llama3_checkpoint(ckpt, depth, hidden=HIDDEN, ffn=FFN)
    f16 = convert(str(ckpt), out, "f16")
    (q8,) = quantize(f16, ["Q8_0"], out, progress=Progress(say=log))
    f16.unlink()
    return q8


def real_shape_head(workdir: Path) -> tuple[Path, float]:
    """NV-Embed-v2's head with random weights, folded and written by the converter; (path, fold seconds)."""
    path = workdir / "nv-embed-v2.head.gguf"
    arch = NVEmbed({"architectures": ["NVEmbedModel"], "text_config": {}}, "bench")
    rng = np.random.default_rng(0)
    d, inner, lat = HIDDEN, 8 * 4096, 512
    shapes = {
        "latents": (lat, d),
        "cross_attend_blocks.0.fn.to_q.weight": (inner, d),
        "cross_attend_blocks.0.fn.to_kv.weight": (2 * inner, d),
        "cross_attend_blocks.0.fn.to_out.weight": (d, inner),
        "cross_attend_blocks.1.fn.net.0.weight": (8 * d, d),
        "cross_attend_blocks.1.fn.net.0.bias": (8 * d,),
        "cross_attend_blocks.1.fn.net.2.weight": (d, 4 * d),
    }

    def load(name: str) -> np.ndarray:
        shape = shapes.get(name.removeprefix(HEAD), (d,))
        scale = 1.0 if len(shape) == 1 else shape[-1] ** -0.5
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    assert all(n in HEAD_TENSORS for n in shapes)
    start = time.perf_counter()
    write_head(arch, load, path)
    return path, time.perf_counter() - start


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.nvembed_head", description=__doc__.split("\n")[0])
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--depths", default="2,4", help="two trunk depths to time and extrapolate from")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nvembed-head")
    args = p.parse_args(argv)
    a, b = (int(x) for x in args.depths.split(","))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    head_path, fold_s = real_shape_head(workdir)
    log(f"head folded and written in {fold_s:.1f} s ({head_path.stat().st_size / 2**20:.0f} MiB)")
    texts = corpus(args.texts)
    rows = {}
    n_tokens = 0
    for depth in (a, b):
        with Engine(trunk_q8(workdir, depth)) as engine:
            seqs = [engine.tokenize(t) for t in texts]
            n_tokens = sum(len(s) for s in seqs)
            engine.embed_tokens(seqs)  # warm-up: context creation, page-in
            rows[f"trunk, {depth} layers (Q8_0)"] = timed(lambda e=engine, s=seqs: e.embed_tokens(s), args.repeats)
    trunk32 = rows[f"trunk, {a} layers (Q8_0)"] + (LAYERS - a) * (
        rows[f"trunk, {b} layers (Q8_0)"] - rows[f"trunk, {a} layers (Q8_0)"]
    ) / (b - a)
    rows[f"trunk, {LAYERS} layers (extrapolated)"] = trunk32
    head = LatentAttentionHead(head_path, None, head_path)
    states = np.random.default_rng(1).standard_normal((n_tokens, HIDDEN), dtype=np.float32)
    head.forward(states[:64])
    rows["latent-attention head (float32 numpy)"] = head_s = timed(lambda: head.forward(states), args.repeats)

    print(f"{len(texts)} texts, {n_tokens} tokens, median of {args.repeats}")
    print("| Stage | Seconds | Tokens/s |")
    print("|:---|---:|---:|")
    for name, s in rows.items():
        print(f"| {name} | {s:.2f} | {n_tokens / s:.0f} |")
    print(f"\nHead share of NV-Embed-v2 time at Q8_0 on CPU: {head_s / (trunk32 + head_s):.1%}")
    print(f"Folding the head at conversion: {fold_s:.1f} s")


if __name__ == "__main__":
    main()
