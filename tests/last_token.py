"""Last-token embedders: the registry's families as tiny checkpoints (tests/synth.py) and their transformers
float32 reference.

The reference runs the model as its card does: the HF tokenizer's own special tokens (the appended EOS is
the token that is pooled), right padding, causal attention or a bidirectional mask, the final hidden state
of each text's last non-padding token, L2 norm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.reference import bidirectional_states, padded_batches

# name -> (architecture, tokenizer, causal, build options); the layouts of the registry's last-token models.
LAST_TOKEN = {
    # Qwen3-Embedding: causal Qwen3 (q/k norms), <|endoftext|> appended by the tokenizer. head_dim x heads is
    # not hidden here (as in Qwen3-Embedding-0.6B/4B), so attention.key_length is exercised too.
    "qwen3-embedding": ("Qwen3ForCausalLM", "qwen2-eos", True, dict(head_dim=32)),
    # gte-Qwen2-7B-instruct: Qwen2 with q/k/v biases, bidirectional, <|endoftext|> appended.
    "gte-qwen2": ("Qwen2ForCausalLM", "qwen2-eos", False, {}),
    # e5-mistral-7b-instruct (and SFR/Linq): a causal MistralModel trunk, </s> appended.
    "e5-mistral": ("MistralModel", "mistral-eos", True, {}),
}


def convert_flags(name: str) -> list[str]:
    """`runner convert` flags that declare NAME's pooling and attention (a checkpoint with no registry entry)."""
    arch, _, causal, _ = LAST_TOKEN[name]
    flags = ["--pooling", "last", "--causal" if causal else "--bidirectional"]
    return flags + (["--as-embedder"] if arch.endswith("ForCausalLM") else [])


def reference_last_token(model_dir: Path, texts: list[str], causal: bool, batch_size: int = 8) -> np.ndarray:
    """transformers float32: right padding, causal or bidirectional attention, last real token, L2 norm."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for enc in padded_batches(model_dir, texts, batch_size):
        keep = enc["attention_mask"]
        if causal:
            with torch.no_grad():
                hidden = model(input_ids=enc["input_ids"], attention_mask=keep).last_hidden_state
        else:
            hidden = bidirectional_states(model, enc["input_ids"], keep.to(torch.float32))
        last = hidden[torch.arange(len(hidden)), keep.sum(1) - 1]
        out.append(torch.nn.functional.normalize(last, dim=-1).numpy())
    return np.concatenate(out)
