"""Qwen2 and Qwen3 trunks (GGUF archs `qwen2`, `qwen3`), run by llama.cpp with the pooling the GGUF names.

Covers Qwen3-Embedding (Qwen3ForCausalLM, causal, last-token pooling on the `<|endoftext|>` its tokenizer
appends) and gte-Qwen2-7B-instruct (Qwen2ForCausalLM, bidirectional, last-token pooling), plus bare
Qwen2Model/Qwen3Model trunks. Differences from the llama family: Qwen2 has q/k/v biases, Qwen3 RMS-norms
each head's q and k (and may have head_dim x heads != hidden); both rotate NEOX-style, as HF does, so the
Q/K rows need no permutation. The causal-LM checkpoints' lm_head (or tied embeddings) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gguf

from quantize.architectures import (
    F32,
    Decoder,
    DecoderArgs,
    Trunk,
    TrunkArgs,
    number,
    register,
    shown,
    table,
)
from quantize.errors import UnsupportedArchitecture
from quantize.sizes import TensorSpec


@dataclass(frozen=True)
class QwenArgs(DecoderArgs):
    @property
    def key_length(self) -> int | None:
        return self.head_dim  # Qwen3's may differ from hidden / heads

    @classmethod
    def from_config(cls, config: dict, where: str, free_head_dim: bool) -> QwenArgs:
        """FREE_HEAD_DIM: config.json's head_dim may differ from hidden/heads (Qwen3; llama.cpp's qwen2 graph
        assumes they are equal)."""
        t = Trunk.from_config(config, where, context=32768)
        head_dim = (t.head_dim if free_head_dim else None) or t.hidden // t.heads
        if not free_head_dim and head_dim * t.heads != t.hidden:
            raise UnsupportedArchitecture(f"{where}: hidden_size {t.hidden} does not divide into {t.heads} heads")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"{where}: hidden_act {shown(config['hidden_act'])}; Qwen needs silu")
        if config.get("use_sliding_window"):
            raise UnsupportedArchitecture(f"{where}: sliding-window attention is not supported for Qwen")
        rope = {**table(config, "rope_parameters", where), **table(config, "rope_scaling", where)}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type != "default":
            raise UnsupportedArchitecture(f"{where}: rope scaling {shown(rope_type)} is not supported for Qwen")
        rope_theta = number(rope, "rope_theta", where, 1000000.0, section="rope_parameters.")
        return cls(
            **TrunkArgs.sizes(t),
            num_key_value_heads=t.kv_heads,
            head_dim=head_dim,
            rms_norm_eps=number(config, "rms_norm_eps", where, 1e-6, hi=1.0),
            max_position_embeddings=t.context,
            rope_theta=number(config, "rope_theta", where, rope_theta),
        )


class _Qwen(Decoder):
    # Byte-level BPE, 151k tokens and as many merges: 39.06 bytes a token measured on the Qwen2 vocabulary.
    header_bytes_per_token = 39
    free_head_dim: ClassVar[bool] = False

    def __init__(self, config: dict, where: str) -> None:
        super().__init__(config, where)
        self.hold(QwenArgs.from_config(config, where, self.free_head_dim))

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        a = self.args
        if a.head_dim * a.num_attention_heads != a.hidden_size:
            w.add_key_length(a.head_dim)
            w.add_value_length(a.head_dim)


@register("Qwen2Model")
@register("Qwen2ForCausalLM", causal_lm=True)
class Qwen2(_Qwen):
    gguf_arch = gguf.MODEL_ARCH.QWEN2

    def attention_extras(self, block: str) -> list[TensorSpec]:
        a = self.args
        q_rows, kv_rows = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        return [
            TensorSpec(block + "attn_q.bias", (q_rows,), F32),
            TensorSpec(block + "attn_k.bias", (kv_rows,), F32),
            TensorSpec(block + "attn_v.bias", (kv_rows,), F32),
        ]


@register("Qwen3Model")
@register("Qwen3ForCausalLM", causal_lm=True)
class Qwen3(_Qwen):
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    free_head_dim = True

    def __init__(self, config: dict, where: str) -> None:
        if config.get("attention_bias"):
            raise UnsupportedArchitecture(f"{where}: attention biases are not supported for Qwen3")
        super().__init__(config, where)

    def attention_extras(self, block: str) -> list[TensorSpec]:
        hd = self.args.head_dim
        return [TensorSpec(block + f"attn_{x}_norm.weight", (hd,), F32) for x in ("q", "k")]
