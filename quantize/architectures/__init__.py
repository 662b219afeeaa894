"""One module per HF architecture; each registers the `config.json` architecture names it converts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import gguf
import numpy as np

from quantize.errors import UnsupportedArchitecture


class Architecture(Protocol):
    """What the converter needs from a model family: hyper-parameters and a tensor mapping."""

    gguf_arch: gguf.MODEL_ARCH
    vocab_size: int
    # GGUF tensors llama.cpp adds to F32 activations directly, so they must stay F32 in the file.
    keep_f32: tuple[str, ...]

    def write_hparams(self, writer: gguf.GGUFWriter) -> None: ...

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name for an HF tensor, or None to leave it out (lm_head, rotary caches)."""

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """Reorder or reshape the float32 data for llama.cpp (e.g. the rope permutation of Q/K)."""

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors llama.cpp needs that the checkpoint does not hold (e.g. Llama-3.1 rope factors)."""


def add_trunk_shape(w: gguf.GGUFWriter, *, context: int, hidden: int, layers: int, ffn: int, heads: int) -> None:
    """What every bidirectional trunk writes: its sizes, and attention that is not causal."""
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_causal_attention(False)


def map_tensor(tensor_map: gguf.TensorNameMap, name: str, hf_name: str) -> str:
    """gguf's name for NAME (an HF tensor name, normalised), or an error naming the checkpoint's tensor."""
    mapped = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise UnsupportedArchitecture(f"tensor {hf_name!r} has no llama.cpp counterpart")
    return mapped


# HF architecture name -> (class, is a causal LM that needs an explicit embedder declaration)
_REGISTRY: dict[str, tuple[type, bool]] = {}


def register(*names: str, causal_lm: bool = False):
    def wrap(cls: type) -> type:
        for name in names:
            _REGISTRY[name] = (cls, causal_lm)
        return cls

    return wrap


def supported() -> list[str]:
    return sorted(_REGISTRY)


def for_config(config: dict, embedder: bool, where: str) -> Architecture:
    """The converter for CONFIG; causal LMs only when the caller declared them as embedders."""
    name = (config.get("architectures") or ["<missing>"])[0]
    if name not in _REGISTRY:
        raise UnsupportedArchitecture(
            f"{where}: architecture {name} is not supported; supported: {', '.join(supported())}"
        )
    cls, causal_lm = _REGISTRY[name]
    if causal_lm and not embedder:
        raise UnsupportedArchitecture(
            f"{where}: {name} is a causal language model, not an embedder; declare it in models.toml "
            "(embedder = true) or pass --as-embedder to run it bidirectionally with mean pooling"
        )
    return cls(config, where)


from quantize.architectures import bert, llama, nvembed  # noqa: E402,F401  (each registers itself)
