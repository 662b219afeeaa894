"""Tiny config.json files of each model family, with the keys the published checkpoints carry, and a seeded
fuzzer of them: wrong types, signs and sizes, other shapes, missing keys, nesting.

`mutations(family, seed, n)` yields (description, config.json text); the same seed gives the same files. The
text is what a hostile repo could hold, so it may be JSON that Python's reader accepts but strict JSON does
not (NaN, Infinity), integers past the interpreter's digit limit, or nesting deeper than its recursion limit.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator

# Llama-3 (nemotron's layout): LlamaBidirectionalModel with Llama-3.1 rope scaling, at a tiny size.
NEMOTRON = {
    "architectures": ["LlamaBidirectionalModel"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "mlp_bias": False,
    "model_type": "llama_bidirec",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pooling": "avg",
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 1024,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 512,
}
# e5-mistral's layout: a Mistral trunk with a sliding window.
MISTRAL = {
    "architectures": ["MistralModel"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "model_type": "mistral",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 1024,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": False,
    "vocab_size": 512,
}
# gte-Qwen2's layout (q/k/v biases), as a bare trunk: a causal-LM name needs --as-embedder, which plan has not.
QWEN2 = {
    "architectures": ["Qwen2Model"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 512,
}
# Qwen3-Embedding's layout: q/k norms, head_dim wider than hidden / heads; a bare trunk as above.
QWEN3 = {
    **QWEN2,
    "architectures": ["Qwen3Model"],
    "attention_bias": False,
    "head_dim": 32,
    "model_type": "qwen3",
    "rope_scaling": None,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
QWEN3 = dict(sorted(QWEN3.items()))  # config.json's (sorted) key order, which the seeded mutations walk
# all-MiniLM-L6-v2's layout, smaller.
BERT = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "transformers_version": "4.8.2",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 512,
}
# NV-Embed-v2's layout: a Mistral trunk in text_config, a latent-attention head.
NVEMBED = {
    "architectures": ["NVEmbedModel"],
    "add_eos": True,
    "add_pad_token": True,
    "is_mask_instruction": True,
    "latent_attention_config": {"model_type": "latent_attention", "num_latents_value": 32, "num_cross_heads": 4},
    "mask_type": "b",
    "model_type": "nvembed",
    "padding_side": "right",
    "text_config": {k: v for k, v in MISTRAL.items() if k not in ("architectures", "sliding_window")},
    "torch_dtype": "float16",
}
CONFIGS = {"nemotron": NEMOTRON, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "bert": BERT, "nvembed": NVEMBED}

ODD_VALUES: list[object] = [
    0, -1, -2, 1, 2, 3, 7, 255, 256, 511, 512, 513, 2**16, 2**20 + 1, 2**24 + 1, 2**31 - 1, 2**31, 2**32, 2**63,
    10**30, -(10**30), 1e9, 1.5, 64.0, -64.0, 0.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf"),
    True, False, None, "", "64", "abc", "silu", "llama3", "linear", [], [64], {}, {"a": 1}, "x" * 10_000,
]  # fmt: skip
HUGE_INTEGER = "9" * 5000  # past Python's 4300-digit limit on int(str)
# The keys the family classes read: most mutations aim here, the rest anywhere.
READ = {
    "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim", "rms_norm_eps", "layer_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "rope_type", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings", "sliding_window", "use_sliding_window", "type_vocab_size", "hidden_act",
    "attention_bias", "position_embedding_type", "text_config", "latent_attention_config", "num_latents_value",
    "num_cross_heads", "padding_side", "torch_dtype",
}  # fmt: skip


def _paths(config: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into CONFIG's objects (nested tables included)."""
    out = []
    if isinstance(config, dict):
        for key, value in config.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    return out


def _set(config: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def _get(config: dict, path: tuple) -> object:
    for key in path:
        config = config[key]
    return config


def _delete(config: dict, path: tuple) -> None:
    for key in path[:-1]:
        config = config[key]
    del config[path[-1]]


def _mutate_value(rng: random.Random, value: object) -> tuple[str, object]:
    """A new value for one key: an odd one, or VALUE turned into another type, sign, size or nesting."""
    kind = rng.choice(["odd", "odd", "string", "negate", "scale", "float", "list", "nest"])
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return kind, str(value)
    if kind == "negate" and number:
        return kind, -value
    if kind == "scale" and number:
        return kind, value * rng.choice([0, 2**10, 2**20, 2**40, 10**9])
    if kind == "float" and number:
        return kind, float(value) + rng.choice([0.0, 0.5])
    if kind == "list":
        return kind, [value]
    if kind == "nest":
        return kind, {"value": value}
    return "odd", rng.choice(ODD_VALUES)


def mutations(family: str, seed: int, n: int) -> Iterator[tuple[str, str]]:
    """N mutated config.json texts of FAMILY's tiny config, each with a description that reproduces it."""
    rng = random.Random(f"{seed}-{family}")
    for i in range(n):
        config = copy.deepcopy(CONFIGS[family])
        roll = rng.random()
        if roll < 0.03:  # the whole file is something else
            whole = rng.choice(["[]", "null", "5", '"config"', "[]" * 3, _deep(100_000), HUGE_INTEGER])
            yield f"#{i} the whole file is {whole[:12]!r}", whole
            continue
        done, raw = [], {}
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            paths = _paths(config)
            read = [p for p in paths if p[-1] in READ]
            path = rng.choice(read if read and rng.random() < 0.8 else paths)
            name = ".".join(map(str, path))
            roll = rng.random()
            if roll < 0.12:
                _delete(config, path)
                done.append(f"{name} removed")
                continue
            if roll < 0.18:  # text no json.dumps writes: deep nesting, or an integer Python will not parse
                token, text = f"@raw{len(raw)}@", rng.choice([_deep(rng.choice([3, 100, 100_000])), HUGE_INTEGER])
                raw[json.dumps(token)] = text
                _set(config, path, token)
                done.append(f"{name} = {text[:8]}... ({len(text)} characters)")
                continue
            what, value = _mutate_value(rng, _get(config, path))
            _set(config, path, value)
            done.append(f"{name} = {str(value)[:30]} ({what})")
        text = json.dumps(config)
        for token, value in raw.items():
            text = text.replace(token, value)
        yield f"#{i} " + "; ".join(done), text


def _deep(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth
