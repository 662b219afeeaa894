"""Llama-family trunks run as bidirectional mean-pooling embedders (GGUF arch `llama-embed`).

Covers llama-embed-nemotron-8b (LlamaBidirectionalModel), plain LlamaModel/MistralModel trunks, and
Llama/Mistral causal-LM checkpoints declared as embedders (their lm_head is dropped).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import gguf
import numpy as np

from quantize.architectures import add_trunk_shape, map_tensor, register
from quantize.errors import UnsupportedArchitecture


@register("LlamaBidirectionalModel", "LlamaModel", "MistralModel")
@register("LlamaForCausalLM", "MistralForCausalLM", causal_lm=True)
class Llama:
    gguf_arch = gguf.MODEL_ARCH.LLAMA_EMBED
    keep_f32 = ()

    def __init__(self, config: dict, where: str) -> None:
        def need(key: str):
            if key not in config:
                raise UnsupportedArchitecture(f"{where}: config.json lacks {key!r}")
            return config[key]

        self.hidden = need("hidden_size")
        self.n_layers = need("num_hidden_layers")
        self.n_head = need("num_attention_heads")
        self.n_head_kv = config.get("num_key_value_heads") or self.n_head
        self.ffn = need("intermediate_size")
        self.vocab_size = need("vocab_size")
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.context = config.get("max_position_embeddings", 4096)
        self.head_dim = config.get("head_dim") or self.hidden // self.n_head
        if self.head_dim * self.n_head != self.hidden:
            raise UnsupportedArchitecture(
                f"{where}: head_dim {self.head_dim} x {self.n_head} heads != hidden_size {self.hidden}; "
                "llama.cpp's llama graph needs them equal"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"{where}: hidden_act {config['hidden_act']!r}; llama needs silu")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise UnsupportedArchitecture(f"{where}: attention/MLP biases are not supported for llama")
        # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
        rope = dict(config.get("rope_parameters") or {})
        rope.update(config.get("rope_scaling") or {})
        self.rope_theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        self.rope = rope
        self.rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if self.rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedArchitecture(
                f"{where}: rope scaling {self.rope_type!r} is not supported (default, linear, llama3)"
            )
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        add_trunk_shape(
            w, context=self.context, hidden=self.hidden, layers=self.n_layers, ffn=self.ffn, heads=self.n_head
        )
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(self.eps)
        w.add_rope_freq_base(self.rope_theta)
        w.add_rope_dimension_count(self.head_dim)
        w.add_vocab_size(self.vocab_size)
        if self.rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(self.rope["factor"]))

    def gguf_name(self, hf_name: str) -> str | None:
        if hf_name.endswith("rotary_emb.inv_freq") or hf_name == "lm_head.weight":
            return None
        return map_tensor(self.tensor_map, "model." + hf_name.removeprefix("model."), hf_name)

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        # HF stores Q/K rows for rotate-half rope; llama.cpp rotates interleaved pairs.
        if gguf_name.endswith("attn_q.weight"):
            return _permute(data, self.n_head)
        if gguf_name.endswith("attn_k.weight"):
            return _permute(data, self.n_head_kv)
        return data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        if self.rope_type == "llama3":
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            yield name, llama3_rope_factors(self.rope, self.rope_theta, self.head_dim)


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
