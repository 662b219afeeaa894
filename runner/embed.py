"""Texts to vectors: prompt template, tokenize, truncate to the model's max length, embed, normalise."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quantize import gguf_keys
from quantize.errors import BadInput
from runner.engine import Engine
from runner.model import Prompts


@dataclass
class Stats:
    """Counts over one or more embed_texts calls (a run's summary line)."""

    texts: int = 0
    tokens: int = 0
    truncated: int = 0


def embed_texts(
    engine: Engine,
    texts: Sequence[str],
    prompts: Prompts,
    query: bool = False,
    task: str | None = None,
    max_length: int | None = None,
    normalize: bool = True,
    truncate: bool = True,
    stats: Stats | None = None,
    first_index: int = 0,
) -> np.ndarray:
    """One float32 vector per text, in input order.

    Inputs longer than the model's max length (or MAX_LENGTH) are cut, with a warning on stderr unless
    STATS collects the count for the caller; TRUNCATE=False makes that an error naming the input
    (numbered from FIRST_INDEX + 1).
    """
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
    for i, text in enumerate(texts, first_index + 1):
        if not text.strip():
            raise BadInput(f"input {i}: empty text; remove empty lines from the input")
        tokens = engine.tokenize(prompts.apply(text, query, task, where=f"input {i}"))
        if append_eos:
            tokens = np.append(tokens, np.int32(engine.eos))
        if len(tokens) > limit:
            if not truncate:
                raise BadInput(
                    f"input {i}: {len(tokens)} tokens, over the limit of {limit}; "
                    "shorten it, or drop --no-truncate to cut it"
                )
            truncated += 1
            # Keep a closing EOS/SEP the tokenizer adds; an EOS that is part of the text (NV-Embed) goes
            # with the rest of the tail, as the reference's truncation does.
            keep_last = engine.ends_with_special and not append_eos
            tokens = np.concatenate([tokens[: limit - 1], tokens[-1:]]) if keep_last else tokens[:limit]
        seqs.append(tokens)
    if stats is not None:
        stats.texts += len(seqs)
        stats.tokens += sum(len(t) for t in seqs)
        stats.truncated += truncated
    elif truncated:
        print(f"warning: truncated {truncated} input(s) to {limit} tokens", file=sys.stderr)
    vectors = engine.embed_tokens(seqs, skips=[skip] * len(seqs))
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, 1e-12)
    return vectors
