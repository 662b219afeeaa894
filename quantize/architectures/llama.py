"""Llama-family trunks run as bidirectional mean-pooling embedders (GGUF arch `llama-embed`).

Covers llama-embed-nemotron-8b (LlamaBidirectionalModel), plain LlamaModel/MistralModel trunks, and
Llama/Mistral causal-LM checkpoints declared as embedders (their lm_head is dropped).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import gguf
import numpy as np

from quantize.architectures import (
    MAX_CONTEXT,
    Decoder,
    DecoderArgs,
    Trunk,
    TrunkArgs,
    integer,
    number,
    register,
    shown,
    table,
)
from quantize.errors import CorruptModelFile, UnsupportedArchitecture

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaArgs(DecoderArgs):
    rope_type: str = "default"
    rope: dict[str, float] = field(default_factory=dict)  # the scaling parameters (factor, low/high_freq_factor, ...)

    @classmethod
    def from_config(cls, config: dict, where: str) -> LlamaArgs:
        t = Trunk.from_config(config, where, context=4096)
        head_dim = t.head_dim or t.hidden // t.heads
        if head_dim * t.heads != t.hidden:
            raise UnsupportedArchitecture(
                f"{where}: head_dim {head_dim} x {t.heads} heads != hidden_size {t.hidden}; "
                "llama.cpp's llama graph needs them equal"
            )
        if head_dim % 2:
            raise UnsupportedArchitecture(f"{where}: head_dim {head_dim} is odd; rope rotates pairs of dimensions")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"{where}: hidden_act {shown(config['hidden_act'])}; llama needs silu")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise UnsupportedArchitecture(f"{where}: attention/MLP biases are not supported for llama")
        # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
        rope = {**table(config, "rope_parameters", where), **table(config, "rope_scaling", where)}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise UnsupportedArchitecture(
                f"{where}: rope scaling {shown(rope_type)} is not supported ({', '.join(ROPE_TYPES)})"
            )
        rope_theta = number(rope, "rope_theta", where, 10000.0, section="rope_parameters.")
        return cls(
            **TrunkArgs.sizes(t),
            num_key_value_heads=t.kv_heads,
            head_dim=head_dim,
            rms_norm_eps=number(config, "rms_norm_eps", where, 1e-6, hi=1.0),
            max_position_embeddings=_trained_context(config, where, t.context),
            rope_theta=number(config, "rope_theta", where, rope_theta),
            rope_type=rope_type,
            rope=_rope_scaling(rope, rope_type, where),
        )


@register("LlamaBidirectionalModel", "LlamaModel", "MistralModel")
@register("LlamaForCausalLM", "MistralForCausalLM", causal_lm=True)
class Llama(Decoder):
    gguf_arch = gguf.MODEL_ARCH.LLAMA_EMBED

    def __init__(self, config: dict, where: str) -> None:
        super().__init__(config, where)
        self.hold(LlamaArgs.from_config(config, where))

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        a = self.args
        w.add_vocab_size(a.vocab_size)
        if a.rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(a.rope["factor"]))

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        # HF stores Q/K rows for rotate-half rope; llama.cpp rotates interleaved pairs.
        if gguf_name.endswith("attn_q.weight"):
            return _permute(data, self.args.num_attention_heads)
        if gguf_name.endswith("attn_k.weight"):
            return _permute(data, self.args.num_key_value_heads)
        return data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        a = self.args
        if a.rope_type == "llama3":
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            yield name, llama3_rope_factors(a.rope, a.rope_theta, a.head_dim)


def _trained_context(config: dict, where: str, context: int) -> int:
    """CONTEXT (max_position_embeddings), but no further than a sliding window (Mistral-7B's 4096; NV-Embed sets
    none): llama.cpp's llama-embed graph attends over the whole sequence, which matches a windowed model only on
    sequences no longer than its window. The GGUF's context length caps every max length the runner uses."""
    window = integer(config, "sliding_window", where, 1, MAX_CONTEXT, default=0)
    return min(context, window) if window else context


def _rope_scaling(rope: dict, rope_type: str, where: str) -> dict[str, float]:
    """The scaling parameters ROPE_TYPE reads, checked (llama3_rope_factors divides by high - low)."""
    section = "rope_scaling."
    if rope_type == "linear":
        if rope.get("factor") is None:
            raise CorruptModelFile(f"{where}: config.json rope_scaling is linear but has no factor")
        return {"factor": number(rope, "factor", where, 1.0, section=section)}
    if rope_type != "llama3":
        return {}
    low = number(rope, "low_freq_factor", where, 1.0, section=section)
    high = number(rope, "high_freq_factor", where, 4.0, section=section)
    if high <= low:
        raise CorruptModelFile(
            f"{where}: config.json rope_scaling.high_freq_factor = {high:g} is not above low_freq_factor = {low:g}"
        )
    original = integer(rope, "original_max_position_embeddings", where, 1, MAX_CONTEXT, 8192, section=section)
    return {
        "factor": number(rope, "factor", where, 8.0, section=section),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama-3.1 rope scaling, as llama.cpp's `rope_freqs` tensor expects."""
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, out)
    out = np.where(wavelen > old_ctx / low, factor, out)
    return out.astype(np.float32)
