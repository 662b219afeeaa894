"""NV-Embed's latent-attention pooling head, in numpy, on the per-token states llama.cpp returns.

Per token state h (published modeling code, folded at conversion by quantize/architectures/nvembed.py):
    h = h + softmax_per_head(LN(h) @ scores) @ values        cross-attention over the 512 constant latents
    h = h + ffn_down(a * gelu(g)),  [a | g] = ffn_up(LN(h))  GEGLU feed-forward
then the mean over the pool mask and (by the caller) L2 normalisation.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from quantize.errors import BadInput, CorruptModelFile, ModelNotFound
from quantize.files import sha256

ROWS_PER_STEP = 512  # tokens per head step: bounds the 8 x hidden feed-forward activations in memory


def erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, and torch's default GELU is exact.

    scipy.special.erf would be a large dependency for one function this short.
    """
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x * np.float32(1 / np.sqrt(2))))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


class LatentAttentionHead:
    """The folded head from a sidecar GGUF; `pool` turns one decode's token states into vectors."""

    def __init__(self, path: Path, expected_sha256: str | None, trunk: Path) -> None:
        if not path.is_file():
            raise ModelNotFound(
                f"{trunk}: its pooling head {path.name} is missing from {path.parent}; "
                "re-run `runner convert` on the checkpoint to write it"
            )
        if expected_sha256 and sha256(path) != expected_sha256:
            raise CorruptModelFile(
                f"{path}: this pooling head does not belong to {trunk.name} (sha256 differs from the one "
                "recorded at conversion); re-run `runner convert` and re-quantize so trunk and head match"
            )
        try:
            self._load(gguf.GGUFReader(path))
        except Exception as e:  # a sidecar missing a key or tensor, or of the wrong shapes, is corrupt too
            why = f"{type(e).__name__}: {e}"[:200]
            raise CorruptModelFile(f"{path}: not a readable pooling head ({why}); re-run `runner convert`") from None

    def _load(self, reader: gguf.GGUFReader) -> None:
        arch = reader.fields["general.architecture"].contents()
        t = {tensor.name: np.asarray(tensor.data, dtype=np.float32) for tensor in reader.tensors}
        self.n_heads = int(reader.fields[f"{arch}.head_count"].contents())
        self.eps = float(reader.fields[f"{arch}.layer_norm_epsilon"].contents())
        self.attn_norm = (t["attn_norm.weight"], t["attn_norm.bias"])
        self.scores = t["scores"]  # hidden x (heads * latents), 1/sqrt(head dim) folded in
        self.values = t["values"]  # (heads * latents) x hidden
        self.ffn_norm = (t["ffn_norm.weight"], t["ffn_norm.bias"])
        self.up_t = t["ffn_up.weight"].T  # hidden x 2*ffn, transposed once so each step is one GEMM
        self.up_b = t["ffn_up.bias"]
        self.down_t = t["ffn_down.weight"].T  # ffn x hidden
        self.down_b = t["ffn_down.bias"]
        self.hidden = self.scores.shape[0]
        h, ffn2 = self.hidden, self.up_t.shape[1]
        want = {
            "scores": ((h, self.values.shape[0]), self.scores.shape),
            "values": ((self.scores.shape[1], h), self.values.shape),
            "ffn_up.weight": ((h, ffn2), self.up_t.shape),
            "ffn_down.weight": ((ffn2 // 2, h), self.down_t.shape),
        }
        for name, (expected, got) in want.items():
            if got != expected:
                raise ValueError(f"tensor {name} is {got}, expected {expected}")
        vectors = (*self.attn_norm, *self.ffn_norm, self.down_b)
        if any(v.shape != (h,) for v in vectors) or self.up_b.shape != (ffn2,) or not 0 < self.n_heads:
            raise ValueError("norm, bias or head count does not match the head's width")
        if self.scores.shape[1] % self.n_heads or not np.isfinite(self.eps):
            raise ValueError(f"{self.scores.shape[1]} latent columns do not split into {self.n_heads} heads")

    def forward(self, h: np.ndarray) -> np.ndarray:
        """Each row (a token's final hidden state, float32) through the head."""
        out = np.empty_like(h, dtype=np.float32)
        for start in range(0, len(h), ROWS_PER_STEP):
            out[start : start + ROWS_PER_STEP] = self._step(h[start : start + ROWS_PER_STEP].astype(np.float32))
        return out

    def _step(self, h: np.ndarray) -> np.ndarray:
        s = layer_norm(h, *self.attn_norm, self.eps) @ self.scores
        s = s.reshape(len(h), self.n_heads, -1)
        s -= s.max(-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(-1, keepdims=True)
        h = h + s.reshape(len(h), -1) @ self.values
        up = layer_norm(h, *self.ffn_norm, self.eps) @ self.up_t + self.up_b
        a, g = np.split(up, 2, axis=1)
        return h + (a * gelu(g)) @ self.down_t + self.down_b

    def pool(self, states: np.ndarray, lengths: list[int], skips: list[int], where: list[int]) -> np.ndarray:
        """Mean of the head's output over each sequence's tokens, its first SKIPS[i] positions left out.

        STATES holds the sequences back to back (LENGTHS rows each); WHERE names them (1-based inputs).
        """
        out = self.forward(states)
        vectors = np.empty((len(lengths), self.hidden), dtype=np.float32)
        start = 0
        for i, (n, skip) in enumerate(zip(lengths, skips, strict=True)):
            if skip >= n:
                raise BadInput(
                    f"input {where[i]}: its {n} tokens are all instruction ({skip} tokens), nothing to pool; "
                    "shorten the task or raise --max-length"
                )
            vectors[i] = out[start + skip : start + n].mean(0)
            start += n
        return vectors
