"""NV-Embed-v2 as its published modeling code (modeling_nvembed.py) computes it, in float32 torch.

Written from the published math, never with trust_remote_code: a MistralModel trunk with a plain
bidirectional padding mask, the latent-attention head applied literally (to_q, to_kv over LayerNorm'd
latents, 8-head scaled-dot-product attention, to_out, GEGLU feed-forward), then the mean over the pool
mask (attention mask with its first len(tokenizer.tokenize(instruction)) positions zeroed) and L2 norm.
Also builds tiny random checkpoints in the published layout (tensor names, nested config).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tests.reference import bidirectional_states, copy_tokenizer, hf_tokenizer

HEAD = "latent_attention_model."


def build_tiny_nvembed(
    dest: Path,
    tokenizer_dir: Path,
    *,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 768,
    latents: int = 32,
    cross_heads: int = 2,
    cross_dim_head: int = 128,
    seed: int = 0,
    drop: tuple[str, ...] = (),
) -> Path:
    """A random NVEmbedModel checkpoint: `embedding_model.*` trunk + `latent_attention_model.*` head.

    DROP names head tensors to leave out (to test incomplete checkpoints).
    """
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralModel

    torch.manual_seed(seed)
    text_config = MistralConfig(
        vocab_size=len(hf_tokenizer(tokenizer_dir)),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.05,
        sliding_window=None,
    )
    trunk = MistralModel(text_config)
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    weights = {"embedding_model." + k: v.contiguous() for k, v in trunk.state_dict().items()}
    inner = cross_heads * cross_dim_head

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape) * scale

    head = {
        "latents": rand(latents, hidden, scale=1.0),
        "cross_attend_blocks.0.norm.weight": torch.empty(hidden).uniform_(0.5, 1.5),
        "cross_attend_blocks.0.norm.bias": rand(hidden, scale=0.1),
        "cross_attend_blocks.0.norm_context.weight": torch.empty(hidden).uniform_(0.5, 1.5),
        "cross_attend_blocks.0.norm_context.bias": rand(hidden, scale=0.1),
        # Unit-variance logits, so the softmax over latents is far from uniform and mistakes show.
        "cross_attend_blocks.0.fn.to_q.weight": rand(inner, hidden, scale=hidden**-0.5),
        "cross_attend_blocks.0.fn.to_kv.weight": rand(2 * inner, hidden, scale=hidden**-0.5),
        "cross_attend_blocks.0.fn.to_out.weight": rand(hidden, inner, scale=inner**-0.5),
        "cross_attend_blocks.1.norm.weight": torch.empty(hidden).uniform_(0.5, 1.5),
        "cross_attend_blocks.1.norm.bias": rand(hidden, scale=0.1),
        "cross_attend_blocks.1.fn.net.0.weight": rand(8 * hidden, hidden, scale=hidden**-0.5),
        "cross_attend_blocks.1.fn.net.0.bias": rand(8 * hidden, scale=0.1),
        "cross_attend_blocks.1.fn.net.2.weight": rand(hidden, 4 * hidden, scale=(4 * hidden) ** -0.5),
        "cross_attend_blocks.1.fn.net.2.bias": rand(hidden, scale=0.1),
    }
    weights.update({HEAD + k: v for k, v in head.items() if k not in drop})
    dest.mkdir(parents=True, exist_ok=True)
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    text = text_config.to_dict()
    text.update(architectures=["MistralModel"], model_type="bidir_mistral")
    config = {
        "architectures": ["NVEmbedModel"],
        "model_type": "nvembed",
        "hidden_size": hidden,
        "text_config": text,
        "latent_attention_config": {
            "model_type": "latent_attention",
            "num_latents_value": latents,
            "num_cross_heads": cross_heads,
            "cross_dim_head": cross_dim_head,
            "hidden_dim": hidden,
            "latent_dim": hidden,
            "output_normalize": True,
        },
        "padding_side": "right",
        "add_pad_token": True,
        "add_eos": True,
        "is_mask_instruction": True,
        "mask_type": "b",
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(tokenizer_dir, dest)
    return dest


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
