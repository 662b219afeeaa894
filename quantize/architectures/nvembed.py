"""NV-Embed-v2 (NVEmbedModel): a bidirectional Mistral trunk plus a latent-attention pooling head.

The trunk (`embedding_model.*`) becomes an ordinary `llama-embed` GGUF with pooling `none`, so every
quant of the ladder applies to it. llama.cpp refuses GGUFs holding tensors its graph does not use, so
the head (`latent_attention_model.*`) goes to a sidecar GGUF, `<name>.head.gguf`, whose sha256 the
trunk records. The head is folded at conversion (see `fold_head`) and run by runner/latent_attention.py.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

from quantize import gguf_keys
from quantize.architectures import integer, register, table
from quantize.architectures.llama import Llama  # the trunk is Mistral-7B, which llama-embed runs
from quantize.errors import CorruptModelFile, UnsupportedArchitecture

TRUNK = "embedding_model."
HEAD = "latent_attention_model."
HEAD_ARCH = "latent-attention"
# MistralConfig's defaults, for keys a serialized text_config leaves out.
MISTRAL_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}
# LatentAttentionConfig's defaults (the published config.json may carry only its model_type).
LATENT_DEFAULTS = {"num_latents_value": 512, "num_cross_heads": 8}
MAX_LATENTS = 1 << 16  # the published head has 512
# The head's tensors in the published layout: cross-attention block 0, feed-forward block 1.
HEAD_TENSORS = (
    "latents",
    "cross_attend_blocks.0.norm.weight",
    "cross_attend_blocks.0.norm.bias",
    "cross_attend_blocks.0.norm_context.weight",
    "cross_attend_blocks.0.norm_context.bias",
    "cross_attend_blocks.0.fn.to_q.weight",
    "cross_attend_blocks.0.fn.to_kv.weight",
    "cross_attend_blocks.0.fn.to_out.weight",
    "cross_attend_blocks.1.norm.weight",
    "cross_attend_blocks.1.norm.bias",
    "cross_attend_blocks.1.fn.net.0.weight",
    "cross_attend_blocks.1.fn.net.0.bias",
    "cross_attend_blocks.1.fn.net.2.weight",
    "cross_attend_blocks.1.fn.net.2.bias",
)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the published head uses
QUERY_PROMPT = "Instruct: {task}\nQuery: {text}"  # the model card's query format; passages get none


@register("NVEmbedModel")
class NVEmbed(Llama):
    pooling = "latent-attention"
    head_arch = HEAD_ARCH
    can_be_causal = False

    def __init__(self, config: dict, where: str) -> None:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise UnsupportedArchitecture(f"{where}: NVEmbedModel config.json lacks its text_config (the trunk)")
        if config.get("padding_side", "right") != "right":
            raise UnsupportedArchitecture(f"{where}: padding_side {config['padding_side']!r}; NV-Embed uses right")
        super().__init__({**MISTRAL_DEFAULTS, **text, "sliding_window": None}, where)
        latent = {**LATENT_DEFAULTS, **table(config, "latent_attention_config", where)}
        section = "latent_attention_config."
        self.latent = {
            "num_latents_value": integer(latent, "num_latents_value", where, 1, MAX_LATENTS, section=section),
            "num_cross_heads": integer(latent, "num_cross_heads", where, 1, self.args.hidden_size, section=section),
        }
        self.skip_instruction = bool(config.get("is_mask_instruction", True))
        self.append_eos = bool(config.get("add_eos", True))

    def gguf_name(self, hf_name: str) -> str | None:
        if hf_name.startswith(HEAD):
            return None  # into the sidecar
        if not hf_name.startswith(TRUNK):
            raise UnsupportedArchitecture(f"{self.where}: tensor {hf_name!r} is neither trunk nor head")
        return super().gguf_name(hf_name.removeprefix(TRUNK))

    def metadata_defaults(self) -> dict[str, object]:
        """What a bare converted file carries when no registry entry says otherwise."""
        return {
            gguf_keys.QUERY_PROMPT: QUERY_PROMPT,
            gguf_keys.DOCUMENT_PROMPT: "{text}",
            gguf_keys.POOL_SKIP_INSTRUCTION: self.skip_instruction,
            gguf_keys.APPEND_EOS: self.append_eos,
        }

    def head_bytes(self) -> int:
        """The folded head in float32: scores + values (hidden x heads*latents each), GEGLU, norms."""
        hidden = self.args.hidden_size
        hl = self.latent["num_cross_heads"] * self.latent["num_latents_value"]
        return 4 * (2 * hidden * hl + 8 * hidden * hidden + 4 * hidden * hidden + 8 * hidden + 5 * hidden)

    def head_tensors(self, load: Callable[[str], np.ndarray | None]) -> dict[str, np.ndarray]:
        """The folded head (see fold_head) from the checkpoint tensors LOAD returns by HF name."""
        raw = {}
        for name in HEAD_TENSORS:
            data = load(HEAD + name)
            if data is None:
                raise CorruptModelFile(
                    f"{self.where}: NV-Embed checkpoint lacks head tensor {HEAD + name!r}; "
                    "download the complete checkpoint (all *.safetensors shards)"
                )
            raw[name] = data
        return fold_head(raw, self.latent["num_cross_heads"], self.args.hidden_size, self.where)

    def write_head(self, w: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> None:
        w.add_uint32(f"{HEAD_ARCH}.head_count", self.latent["num_cross_heads"])
        w.add_float32(f"{HEAD_ARCH}.layer_norm_epsilon", LAYER_NORM_EPS)
        for name, data in tensors.items():
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = LAYER_NORM_EPS) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def fold_head(raw: dict[str, np.ndarray], n_heads: int, hidden: int, where: str) -> dict[str, np.ndarray]:
    """Fold the constant latents into the attention weights, in float64.

    Cross-attention of token x over the latents, per head h (q/k/v columns h*dh..(h+1)*dh):
        softmax(to_q_h(x) . k_h^T / sqrt(dh)) v_h to_out_h^T
    Keys and values come from the constant latents, so to_q_h followed by k_h^T is one
    hidden x latents matrix (`scores`) and v_h followed by to_out_h one latents x hidden matrix
    (`values`): per token, two products of 4096 x 4096 instead of to_q (32768 x 4096), the attention
    and to_out (4096 x 32768). The feed-forward block is kept as is.
    """
    latents = raw["latents"]
    to_q = raw["cross_attend_blocks.0.fn.to_q.weight"]
    to_kv = raw["cross_attend_blocks.0.fn.to_kv.weight"]
    to_out = raw["cross_attend_blocks.0.fn.to_out.weight"]
    inner = to_q.shape[0]
    if (
        latents.shape[1] != hidden
        or to_q.shape[1] != hidden
        or to_kv.shape != (2 * inner, latents.shape[1])
        or to_out.shape != (hidden, inner)
        or inner % n_heads
    ):
        raise CorruptModelFile(
            f"{where}: head tensor shapes do not fit together (latents {latents.shape}, to_q {to_q.shape}, "
            f"to_kv {to_kv.shape}, to_out {to_out.shape}, {n_heads} heads, hidden {hidden})"
        )
    dh = inner // n_heads
    f64 = np.float64
    context = layer_norm(
        latents.astype(f64),
        raw["cross_attend_blocks.0.norm_context.weight"].astype(f64),
        raw["cross_attend_blocks.0.norm_context.bias"].astype(f64),
    )
    scores, values = [], []
    for h in range(n_heads):  # one head at a time, so float64 copies stay small
        cols = slice(h * dh, (h + 1) * dh)
        keys = context @ to_kv[cols].astype(f64).T  # latents x dh
        vals = context @ to_kv[inner + h * dh : inner + (h + 1) * dh].astype(f64).T
        scores.append((to_q[cols].astype(f64).T @ keys.T / np.sqrt(dh)).astype(np.float32))  # hidden x latents
        values.append((vals @ to_out[:, cols].astype(f64).T).astype(np.float32))  # latents x hidden
    return {
        "attn_norm.weight": raw["cross_attend_blocks.0.norm.weight"],
        "attn_norm.bias": raw["cross_attend_blocks.0.norm.bias"],
        "scores": np.concatenate(scores, axis=1),
        "values": np.concatenate(values, axis=0),
        "ffn_norm.weight": raw["cross_attend_blocks.1.norm.weight"],
        "ffn_norm.bias": raw["cross_attend_blocks.1.norm.bias"],
        "ffn_up.weight": raw["cross_attend_blocks.1.fn.net.0.weight"],
        "ffn_up.bias": raw["cross_attend_blocks.1.fn.net.0.bias"],
        "ffn_down.weight": raw["cross_attend_blocks.1.fn.net.2.weight"],
        "ffn_down.bias": raw["cross_attend_blocks.1.fn.net.2.bias"],
    }
