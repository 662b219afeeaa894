"""How sequences go to llama.cpp: micro-batches under a token budget and a sequence cap, context sizes.

Pure functions of lengths, shared by the engine (which packs with them) and the memory model (which
sizes the buffers they imply), so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

# llama.cpp pads the KV cache to 256 cells; a micro-batch of another size failed its mul_mat shape
# assertion (the process aborts), so token budgets are whole multiples of 256.
KV_PAD = 256
# The smallest budget the engine makes a context for; grown to the longest sequence when needed.
MIN_TOKEN_BUDGET = 512
# llama.cpp's LLAMA_MAX_SEQ: sequences one decode can hold.
MAX_SEQS_PER_DECODE = 256


def token_budget(longest: int) -> int:
    """Tokens per micro-batch (= n_ctx = n_batch = n_ubatch) for sequences up to LONGEST tokens.

    Non-causal models attend over the whole micro-batch, so every sequence must fit in one.
    """
    return -(-max(MIN_TOKEN_BUDGET, longest) // KV_PAD) * KV_PAD


def max_seqs(budget: int) -> int:
    """Sequences per micro-batch: no more than tokens (llama.cpp asserts n_seq_max <= n_batch)."""
    return min(MAX_SEQS_PER_DECODE, budget)


def pack(lengths: Sequence[int], budget: int, seq_cap: int) -> list[list[int]]:
    """Indices of LENGTHS grouped into micro-batches of at most BUDGET tokens and SEQ_CAP sequences.

    Longest first (stable), so a sequence that cannot be decoded fails in the first batch; each
    sequence must itself fit the budget.
    """
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise ValueError(f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens, over the budget of {budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    used = 0
    for i in order:
        if batch and (used + lengths[i] > budget or len(batch) == seq_cap):
            batches.append(batch)
            batch, used = [], 0
        batch.append(i)
        used += lengths[i]
    if batch:
        batches.append(batch)
    return batches
