"""Texts to vectors: prompt template, tokenize, truncate to the model's max length, embed, normalise."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from quantize import gguf_keys
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
    # NV-Embed: each text is `instruction + text + eos_token` and its mean leaves out the first
    # len(tokenize(instruction)) positions (counted without BOS, zeroed from position 0: BOS included).
    append_eos = engine.flag(gguf_keys.APPEND_EOS)
    skip = 0
    if engine.flag(gguf_keys.POOL_SKIP_INSTRUCTION) and texts:
        instruction = prompts.instruction(query, task, where=engine.path.name)
        skip = len(engine.tokenize(instruction, special=False)) if instruction else 0
    seqs = []
    truncated = 0
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise BadInput(f"input {i}: empty text; remove empty lines from the input")
        tokens = engine.tokenize(prompts.apply(text, query, task, where=f"input {i}"))
        if append_eos:
            tokens = np.append(tokens, np.int32(engine.eos))
        if len(tokens) > limit:
            truncated += 1
            # Keep a closing EOS/SEP the tokenizer adds; an EOS that is part of the text (NV-Embed) goes
            # with the rest of the tail, as the reference's truncation does.
            keep_last = engine.ends_with_special and not append_eos
            tokens = np.concatenate([tokens[: limit - 1], tokens[-1:]]) if keep_last else tokens[:limit]
        seqs.append(tokens)
    if truncated:
        print(f"warning: truncated {truncated} input(s) to {limit} tokens", file=sys.stderr)
    vectors = engine.embed_tokens(seqs, skips=[skip] * len(seqs))
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, 1e-12)
    return vectors
