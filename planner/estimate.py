"""How long an input will take: its tokens over the tokens/s this machine gives the chosen quant, and what would be
faster when that is long. Pure: the token count and the speeds come from the caller (the tokenizer or the file's
size; the calibration or a measured micro-batch).

>>> wall_clock(28_754, "tokenized", "Q6_K", {"Q6_K": 6.4, "Q4_K_M": 9.0}).seconds > 4000
True
"""

from __future__ import annotations

from dataclasses import dataclass

LONG_SECONDS = 600  # past this an estimate suggests something faster
BYTES_PER_TOKEN = 4  # a rough count for text when tokenizing the whole file would itself take long


@dataclass(frozen=True)
class Estimate:
    tokens: int
    counted: str  # how the tokens were counted: "tokenized" or "bytes/4"
    tokens_per_s: float | None  # None: no speed known for the chosen quant here
    faster: tuple[str, float] | None = None  # (quant, its seconds) when that is faster than a long estimate

    @property
    def seconds(self) -> float | None:
        return self.tokens / self.tokens_per_s if self.tokens_per_s else None

    def line(self, quant: str) -> str:
        """One line for `runner plan` and the start of `runner embed`."""
        tokens = f"{self.tokens:,} tokens ({self.counted})"
        if self.seconds is None:
            return f"estimate: {tokens}; no speed known for {quant} here (`runner calibrate -m MODEL` measures one)"
        said = f"estimate: {tokens} at {self.tokens_per_s:.1f} tokens/s ≈ {duration(self.seconds)} with {quant}"
        if self.seconds <= LONG_SECONDS:
            return said
        if self.faster:
            other, seconds = self.faster
            return f"{said}; --quant {other} ≈ {duration(seconds)}, or a smaller model is faster still"
        return f"{said}; a smaller model or a GPU is faster"


def wall_clock(tokens: int, counted: str, quant: str, speeds: dict[str, float | None]) -> Estimate:
    """TOKENS (counted as COUNTED says) at the tokens/s SPEEDS gives QUANT; when that takes over LONG_SECONDS, the
    fastest quant in SPEEDS too, if it is faster."""
    rate = speeds.get(quant)
    estimate = Estimate(tokens, counted, rate)
    known = {q: s for q, s in speeds.items() if s}
    if rate and tokens / rate > LONG_SECONDS and known:
        best = max(known, key=lambda q: known[q])
        if known[best] > rate:
            estimate = Estimate(tokens, counted, rate, (best, tokens / known[best]))
    return estimate


def duration(seconds: float) -> str:
    """Seconds for people: 40 s, 12 min, 1 h 15 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
