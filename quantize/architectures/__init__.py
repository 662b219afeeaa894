"""One class per model family, registered by the `config.json` architecture names it handles.

A family class owns everything about its family: typed hyper-parameters parsed once from config.json
(its `Args`), the tensor mapping and transforms, the GGUF metadata it writes, and the F16 tensor layout
the planner sizes before any weight is downloaded. Adding a family is one file here and one models.toml row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np

from quantize.errors import UnsupportedArchitecture
from quantize.sizes import TensorSpec

F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32


@dataclass(frozen=True)
class Trunk:
    """The transformer sizes every family has; what the memory model needs besides the tensor list."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    context: int  # longest sequence the model was trained for
    head_dim: int | None = None  # when it is not hidden / heads (Qwen3-0.6B: 16 heads of 128 in 1024)


def require(config: dict, key: str, where: str):
    """config[KEY], or a one-line error naming the checkpoint and the missing key."""
    if key not in config:
        raise UnsupportedArchitecture(f"{where}: config.json lacks {key!r}")
    return config[key]


class Family:
    """Base class: the hooks the converter and the planner call, with no-op defaults."""

    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # The pooling this family always uses (NV-Embed's head); None: from the registry or the checkpoint.
    pooling: ClassVar[str | None] = None
    # GGUF tensors llama.cpp adds to F32 activations directly, so they must stay F32 in the file.
    keep_f32: ClassVar[tuple[str, ...]] = ()
    # The GGUF architecture name of the pooling head's sidecar file, for families that have one.
    head_arch: ClassVar[str | None] = None
    # GGUF header bytes per vocabulary entry, for sizing a file before it exists (measured per tokenizer kind).
    header_bytes_per_token: ClassVar[int] = 48
    # Whether --causal means anything for this family (BERT and NV-Embed's trunk were trained bidirectional).
    can_be_causal: ClassVar[bool] = True

    def __init__(self, config: dict, where: str) -> None:
        self.where = where
        # Causal attention (Qwen3-Embedding, e5-mistral) or bidirectional (the default: nemotron, gte-Qwen2).
        self.causal = False

    # --- what the planner reads -----------------------------------------------------------------
    @property
    def trunk(self) -> Trunk:
        raise NotImplementedError

    def tensor_specs(self) -> tuple[TensorSpec, ...]:
        """Every tensor of the F16 GGUF this family's converter writes: name, shape, type."""
        raise NotImplementedError

    def head_bytes(self) -> int:
        """Bytes of a pooling head the runner holds in RAM beside the trunk (0: llama.cpp pools)."""
        return 0

    @property
    def per_token_outputs(self) -> bool:
        """llama.cpp hands back every token's state (the runner pools), not one pooled vector."""
        return self.pooling == "latent-attention"

    # --- what the converter calls ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.trunk.vocab

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        """Sizes every trunk writes, and whether attention is causal; families add their own keys."""
        t = self.trunk
        w.add_context_length(t.context)
        w.add_embedding_length(t.hidden)
        w.add_block_count(t.layers)
        w.add_feed_forward_length(t.ffn)
        w.add_head_count(t.heads)
        w.add_causal_attention(self.causal)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name for an HF tensor, or None to leave it out (lm_head, rotary caches)."""
        raise NotImplementedError

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """Reorder or reshape the float32 data for llama.cpp (e.g. the rope permutation of Q/K)."""
        return data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors llama.cpp needs that the checkpoint does not hold (e.g. Llama-3.1 rope factors)."""
        return iter(())

    def metadata_defaults(self) -> dict[str, object]:
        """Keys a bare converted file carries when no registry entry says otherwise (prompts, pooling rules)."""
        return {}

    def head_tensors(self, load: Callable[[str], np.ndarray | None]) -> dict[str, np.ndarray] | None:
        """A pooling head for a sidecar GGUF, from the checkpoint tensors LOAD returns by HF name; None: no head."""
        return None

    def write_head(self, w: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


def decoder_layer_specs(
    i: int, hidden: int, ffn: int, q_rows: int, kv_rows: int, extras: tuple[TensorSpec, ...] = ()
) -> list[TensorSpec]:
    """One pre-norm decoder layer's tensors as llama.cpp names them (llama, Mistral, Qwen): attention with
    EXTRAS after it (biases, q/k norms), then the gated FFN."""
    b = f"blk.{i}."
    return [
        TensorSpec(b + "attn_norm.weight", (hidden,), F32),
        TensorSpec(b + "attn_q.weight", (q_rows, hidden), F16),
        TensorSpec(b + "attn_k.weight", (kv_rows, hidden), F16),
        TensorSpec(b + "attn_v.weight", (kv_rows, hidden), F16),
        TensorSpec(b + "attn_output.weight", (hidden, q_rows), F16),
        *extras,
        TensorSpec(b + "ffn_norm.weight", (hidden,), F32),
        TensorSpec(b + "ffn_gate.weight", (ffn, hidden), F16),
        TensorSpec(b + "ffn_up.weight", (ffn, hidden), F16),
        TensorSpec(b + "ffn_down.weight", (hidden, ffn), F16),
    ]


def map_tensor(tensor_map: gguf.TensorNameMap, name: str, hf_name: str) -> str:
    """gguf's name for NAME (an HF tensor name, normalised), or an error naming the checkpoint's tensor."""
    mapped = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise UnsupportedArchitecture(f"tensor {hf_name!r} has no llama.cpp counterpart")
    return mapped


# HF architecture name -> (class, is a causal LM that needs an explicit embedder declaration)
_REGISTRY: dict[str, tuple[type[Family], bool]] = {}


def register(*names: str, causal_lm: bool = False):
    def wrap(cls: type[Family]) -> type[Family]:
        for name in names:
            _REGISTRY[name] = (cls, causal_lm)
        return cls

    return wrap


def supported() -> list[str]:
    return sorted(_REGISTRY)


def for_config(config: dict, embedder: bool, where: str, causal: bool = False) -> Family:
    """The family for CONFIG; causal LMs only when the caller declared them as embedders.

    CAUSAL: run attention causally (last-token embedders trained that way); the default is bidirectional.
    """
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs else "<missing>"
    if name not in _REGISTRY:
        raise UnsupportedArchitecture(
            f"{where}: architecture {name} is not supported; supported: {', '.join(supported())}"
        )
    cls, causal_lm = _REGISTRY[name]
    if causal_lm and not embedder:
        raise UnsupportedArchitecture(
            f"{where}: {name} is a causal language model, not an embedder; declare it in models.toml "
            "(embedder = true) or pass --as-embedder (bidirectional mean pooling unless --pooling/--causal say "
            "otherwise)"
        )
    if causal and not cls.can_be_causal:
        raise UnsupportedArchitecture(f"{where}: {name} is a bidirectional encoder; it cannot run with --causal")
    family = cls(config, where)
    family.causal = causal
    return family


from quantize.architectures import bert, llama, nvembed, qwen  # noqa: E402,F401  (each registers itself)
