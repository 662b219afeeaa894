"""Retrieval quality per output precision: top-10 neighbour overlap with float32, ours beside
sentence-transformers' quantize_embeddings on the same vectors.

    python -m bench.precision [--model all-minilm-l6-v2] [--texts 1000] [--calibration 200]

Embeds `tests.corpus` texts (seed 0) once with MODEL (float32, L2-normalised), then quantizes those same
vectors to each precision with runner.compact.quantize (what `runner embed --precision` and
`Embedder.encode(precision=)` write) and with sentence-transformers' quantize_embeddings, and finds each
text's 10 nearest other texts: by cosine for float32/float16, by Euclidean distance between the integer codes
for int8/uint8 (what a scalar-quantized index compares: the same ranking for both), by Hamming distance for
binary/ubinary. Overlap: the mean share of those 10 that are also float32's 10. int8/uint8 rows take their
ranges from the data itself and from --calibration other texts of the corpus (its next ones), the two ways
`runner embed` offers. Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

from runner import Embedder, compact
from tests.corpus import corpus

TOP_K = 10
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def neighbours(distance: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Each row's K nearest other rows under DISTANCE (n x n, smaller is nearer)."""
    distance = distance.astype(np.float64, copy=True)
    np.fill_diagonal(distance, np.inf)
    return np.argsort(distance, axis=1, kind="stable")[:, :k]


def distances(codes: np.ndarray, precision: str) -> np.ndarray:
    if precision in ("float32", "float16"):
        v = codes.astype(np.float32)
        return -(v @ v.T)  # unit vectors: cosine
    if precision in compact.RANGED:
        v = codes.astype(np.float32)
        sq = (v * v).sum(1)
        return sq[:, None] + sq[None, :] - 2 * (v @ v.T)  # squared Euclidean: the same order
    bits = codes.view(np.uint8)
    return np.stack([POPCOUNT[np.bitwise_xor(bits, row)].sum(1) for row in bits])  # Hamming


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / TOP_K for x, y in zip(a, b, strict=True)]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--calibration", type=int, default=200, help="other corpus texts for calibrated int8/uint8 rows")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers.util.quantization import quantize_embeddings

    items = corpus(args.texts + args.calibration)
    started = time.perf_counter()
    with Embedder(args.model) as model:
        every = model.encode(items, batch_size=256)
    print(f"embedded {len(items)} texts in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    vectors, calibration = every[: args.texts], every[args.texts :]
    reference = neighbours(distances(vectors, "float32"))
    rows = []
    for precision in compact.PRECISIONS:
        sources = ("the data", f"{args.calibration} other texts") if precision in compact.RANGED else ("",)
        for source in sources:
            ranges = compact.ranges_of(calibration) if source.endswith("other texts") else None
            ours = compact.quantize(vectors, precision, ranges)
            # float16 is not one of quantize_embeddings' precisions.
            theirs = None if precision == "float16" else quantize_embeddings(vectors, precision, ranges=ranges)
            cells = [f"{precision} (ranges from {source})" if source else precision, str(ours.nbytes // len(ours))]
            for codes in (ours, theirs):
                cells.append(
                    "n/a" if codes is None else f"{overlap(reference, neighbours(distances(codes, precision))):.3f}"
                )
            cells.append("n/a" if theirs is None else ("yes" if np.array_equal(ours, theirs) else "no"))
            rows.append(cells)
    head = ["precision", "bytes/vector", f"top-{TOP_K} overlap, ours", f"top-{TOP_K} overlap, quantize_embeddings"]
    print("| " + " | ".join([*head, "same values"]) + " |")
    print("|:---|---:|---:|---:|:---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    print(
        f"\n`python -m bench.precision --texts {args.texts} --calibration {args.calibration}` — {args.model}, "
        f"{args.texts} texts of `tests.corpus` (seed 0), neighbours against float32's."
    )


if __name__ == "__main__":
    main()
