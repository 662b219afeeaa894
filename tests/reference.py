"""The independent reference: transformers in float32, bidirectional attention, mean pooling, L2 norm.

Also the tokenizer as the checkpoints publish it. The checkpoints themselves come from tests/synth.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def copy_tokenizer(src: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)


def hf_tokenizer(model_dir: Path):
    """The checkpoint's published tokenizer.json, exactly (transformers' fast tokenizer over it).

    Not AutoTokenizer: transformers 5 rebuilds Llama/Mistral SentencePiece tokenizers from its own
    class instead of tokenizer.json, and drops the leading "\u2581" of texts that start with a space
    (30 of our 466 corpus lines), which the published tokenizer and the models' training did not.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def padded_tokenizer(model_dir: Path):
    """The published tokenizer, padding on the right (with EOS, or UNK, where it has no pad token)."""
    tok = hf_tokenizer(model_dir)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def padded_batches(model_dir: Path, texts: list[str], batch_size: int):
    """TEXTS through padded_tokenizer in batches of BATCH_SIZE: the references exercise padding too."""
    tok = padded_tokenizer(model_dir)
    for start in range(0, len(texts), batch_size):
        yield tok(texts[start : start + batch_size], padding=True, return_tensors="pt")


def reference_embed(model_dir: Path, texts: list[str], batch_size: int = 8) -> np.ndarray:
    """float32 transformers forward with a bidirectional padding mask, mean pooling, L2 norm.

    Texts are batched with right padding, so padding handling is exercised too.
    """
    from transformers import LlamaModel, MistralModel

    config = json.loads((model_dir / "config.json").read_text())
    cls = MistralModel if config.get("model_type") == "mistral" else LlamaModel
    model = cls.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for enc in padded_batches(model_dir, texts, batch_size):
        keep = enc["attention_mask"].to(torch.float32)
        hidden = bidirectional_states(model, enc["input_ids"], keep)
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def bidirectional_states(model, input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Final hidden states when every token may attend to every non-padding token of its own text."""
    mask = (1.0 - keep[:, None, None, :]) * torch.finfo(torch.float32).min
    mask = mask.expand(-1, 1, keep.shape[1], -1)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).last_hidden_state


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)
