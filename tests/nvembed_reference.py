"""NV-Embed-v2 as its published modeling code (modeling_nvembed.py) computes it, in float32 torch.

Written from the published math, never with trust_remote_code: a MistralModel trunk with a plain
bidirectional padding mask, the latent-attention head applied literally (to_q, to_kv over LayerNorm'd
latents, 8-head scaled-dot-product attention, to_out, GEGLU feed-forward), then the mean over the pool
mask (attention mask with its first len(tokenizer.tokenize(instruction)) positions zeroed) and L2 norm.
The tiny checkpoints in the published layout (tensor names, nested config) come from tests/synth.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tests.reference import bidirectional_states, hf_tokenizer
from tests.synth import NVEMBED_HEAD as HEAD


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def literal_head(h: torch.Tensor, w: dict[str, torch.Tensor], n_heads: int) -> torch.Tensor:
    """The published LatentAttentionModel's two residual blocks on token states H (batch x tokens x hidden)."""
    d = h.shape[-1]

    def w_(name: str) -> torch.Tensor:
        return w[HEAD + name]

    x = F.layer_norm(h, (d,), w_("cross_attend_blocks.0.norm.weight"), w_("cross_attend_blocks.0.norm.bias"))
    latents = w_("latents")
    ctx = F.layer_norm(
        latents, (d,), w_("cross_attend_blocks.0.norm_context.weight"), w_("cross_attend_blocks.0.norm_context.bias")
    )
    q = x @ w_("cross_attend_blocks.0.fn.to_q.weight").T
    k, v = (ctx @ w_("cross_attend_blocks.0.fn.to_kv.weight").T).chunk(2, dim=-1)
    b, n = q.shape[:2]
    # rearrange 'b n (h d) -> (b h) n d', with the latents repeated over the batch
    q = q.reshape(b, n, n_heads, -1).permute(0, 2, 1, 3)
    k = k.reshape(1, -1, n_heads, q.shape[-1]).permute(0, 2, 1, 3).expand(b, -1, -1, -1)
    v = v.reshape(1, -1, n_heads, q.shape[-1]).permute(0, 2, 1, 3).expand(b, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, n, -1)
    h = out @ w_("cross_attend_blocks.0.fn.to_out.weight").T + h
    y = F.layer_norm(h, (d,), w_("cross_attend_blocks.1.norm.weight"), w_("cross_attend_blocks.1.norm.bias"))
    y = y @ w_("cross_attend_blocks.1.fn.net.0.weight").T + w_("cross_attend_blocks.1.fn.net.0.bias")
    a, gates = y.chunk(2, dim=-1)
    y = (a * F.gelu(gates)) @ w_("cross_attend_blocks.1.fn.net.2.weight").T + w_("cross_attend_blocks.1.fn.net.2.bias")
    return y + h


def reference_nvembed(model_dir: Path, texts: list[str], instruction: str = "", batch_size: int = 8) -> np.ndarray:
    """NVEmbedModel.encode(texts, instruction=INSTRUCTION), normalised, batched with right padding."""
    from transformers import MistralConfig, MistralModel

    config = json.loads((model_dir / "config.json").read_text())
    weights = load_weights(model_dir)
    text = {k: v for k, v in config["text_config"].items() if k not in ("model_type", "architectures")}
    trunk = MistralModel(MistralConfig(**text, attn_implementation="eager")).eval()
    prefix = "embedding_model."
    trunk.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
    n_heads = config["latent_attention_config"]["num_cross_heads"]
    tok = hf_tokenizer(model_dir)
    tok.padding_side = "right"
    tok.pad_token = tok.eos_token
    skip = len(tok.tokenize(instruction)) if instruction else 0
    out = []
    for start in range(0, len(texts), batch_size):
        batch = [instruction + t + tok.eos_token for t in texts[start : start + batch_size]]
        enc = tok(batch, padding=True, return_tensors="pt", return_token_type_ids=False)
        keep = enc["attention_mask"].to(torch.float32)
        with torch.no_grad():
            hidden = literal_head(bidirectional_states(trunk, enc["input_ids"], keep), weights, n_heads)
        pool = keep.clone()
        pool[:, :skip] = 0
        pooled = (hidden * pool[..., None]).sum(1) / pool.sum(1, keepdim=True)
        out.append(F.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)
