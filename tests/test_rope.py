"""Llama-3.1 rope scaling: our rope_freqs tensor against transformers' own llama3 rope initialisation."""

from __future__ import annotations

import numpy as np

from quantize.architectures.llama import llama3_rope_factors
from tests.conftest import LLAMA3_ROPE


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, head_dim = 500000.0, 128
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={"rope_theta": theta, **LLAMA3_ROPE})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    # llama.cpp divides each base frequency by its rope_freqs entry.
    np.testing.assert_allclose(plain / llama3_rope_factors(LLAMA3_ROPE, theta, head_dim), scaled.numpy(), rtol=1e-5)
