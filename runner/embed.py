"""Texts to vectors: prompt template, tokenize, truncate to the model's max length, embed, normalise."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from quantize.errors import BadInput
from runner.engine import Engine
from runner.model import Prompts


def embed_texts(
    engine: Engine,
    texts: Sequence[str],
    prompts: Prompts,
    query: bool = False,
    task: str | None = None,
    max_length: int | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """One float32 vector per text, in input order."""
    limit = min(max_length or engine.n_ctx_train, engine.n_ctx_train)
    seqs = []
    truncated = 0
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise BadInput(f"input {i}: empty text; remove empty lines from the input")
        tokens = engine.tokenize(prompts.apply(text, query, task, where=f"input {i}"))
        if len(tokens) > limit:
            truncated += 1
            tokens = np.concatenate([tokens[: limit - 1], tokens[-1:]]) if engine.ends_with_special else tokens[:limit]
        seqs.append(tokens)
    if truncated:
        print(f"warning: truncated {truncated} input(s) to {limit} tokens", file=sys.stderr)
    vectors = engine.embed_tokens(seqs)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, 1e-12)
    return vectors
