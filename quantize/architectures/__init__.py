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

from quantize.errors import CorruptModelFile, UnsupportedArchitecture
from quantize.gguf_check import MAX_CONTEXT, MAX_FFN, MAX_HEAD_DIM, MAX_LAYERS, MAX_WIDTH
from quantize.sizes import TensorSpec

F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
# config.json is as hostile as a GGUF header (a hub repo comes from strangers) and has no file size to bound
# it: its sizes are held to the limits the GGUF checks apply, before anything is allocated from them.
MAX_VOCAB = 1 << 24  # no tensor-size bound here as in a GGUF; the largest real vocabularies hold ~256k tokens
MAX_FLOAT = 3.0e38  # a GGUF stores these as float32: anything larger becomes inf


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

    @classmethod
    def from_config(cls, config: dict, where: str, context: int) -> Trunk:
        """The sizes config.json declares, each within the limits the GGUF checks apply (quantize/gguf_check.py);
        CONTEXT: the family's default max_position_embeddings. head_dim is config.json's, if it has one: whether
        it may differ from hidden / heads is the family's call."""
        hidden = integer(config, "hidden_size", where, 1, MAX_WIDTH)
        heads = integer(config, "num_attention_heads", where, 1, hidden)
        kv_heads = integer(config, "num_key_value_heads", where, 1, heads, default=heads)
        if heads % kv_heads:
            raise CorruptModelFile(
                f"{where}: config.json num_attention_heads = {heads} is not a multiple of "
                f"num_key_value_heads = {kv_heads}"
            )
        return cls(
            layers=integer(config, "num_hidden_layers", where, 1, MAX_LAYERS),
            hidden=hidden,
            ffn=integer(config, "intermediate_size", where, 1, MAX_FFN),
            heads=heads,
            kv_heads=kv_heads,
            vocab=integer(config, "vocab_size", where, 1, MAX_VOCAB),
            context=integer(config, "max_position_embeddings", where, 1, MAX_CONTEXT, default=context),
            head_dim=integer(config, "head_dim", where, 1, MAX_HEAD_DIM, default=0) or None,
        )


@dataclass(frozen=True)
class TrunkArgs:
    """The sizes every family's Args holds under config.json's names, and the Trunk the planner reads from them.
    A family adds its own fields (max_position_embeddings with its default first of them)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int

    @staticmethod
    def sizes(t: Trunk) -> dict[str, int]:
        """These fields from T, as a family's from_config passes them on."""
        return {
            "hidden_size": t.hidden,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "intermediate_size": t.ffn,
            "vocab_size": t.vocab,
        }

    @property
    def key_length(self) -> int | None:
        """The per-head width the planner needs when it is not hidden / heads (Qwen3); None: it is."""
        return None

    @property
    def trunk(self) -> Trunk:
        return Trunk(
            layers=self.num_hidden_layers,
            hidden=self.hidden_size,
            ffn=self.intermediate_size,
            heads=self.num_attention_heads,
            kv_heads=getattr(self, "num_key_value_heads", self.num_attention_heads),  # BERT: one per head
            vocab=self.vocab_size,
            context=self.max_position_embeddings,  # every family's Args has it
            head_dim=self.key_length,
        )


@dataclass(frozen=True)
class DecoderArgs(TrunkArgs):
    """What every decoder family (llama, Mistral, Qwen) reads besides the shared sizes."""

    max_position_embeddings: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float = 1e-6


def require(config: dict, key: str, where: str):
    """config[KEY], or a one-line error naming the checkpoint and the missing key."""
    if key not in config:
        raise UnsupportedArchitecture(f"{where}: config.json lacks {key!r}")
    return config[key]


def integer(config: dict, key: str, where: str, lo: int, hi: int, default: int | None = None, section: str = "") -> int:
    """config[KEY] as a whole number from LO to HI (DEFAULT when absent or null; required when DEFAULT is None),
    else a one-line error naming config.json, the key (inside SECTION, e.g. "rope_scaling.") and the range."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    value = require(config, key, where)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CorruptModelFile(
            f"{where}: config.json {section}{key} = {shown(value)} is not a whole number from {lo} to {hi}"
        )
    return value


def number(config: dict, key: str, where: str, default: float, hi: float = MAX_FLOAT, section: str = "") -> float:
    """config[KEY] as a number above 0 and at most HI (DEFAULT when absent or null), else a one-line error."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= hi:
        raise CorruptModelFile(
            f"{where}: config.json {section}{key} = {shown(value)} is not a number above 0 and at most {hi:g}"
        )
    return float(value)


def table(config: dict, key: str, where: str) -> dict:
    """config[KEY] as a JSON object ({} when absent or null), else a one-line error."""
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CorruptModelFile(f"{where}: config.json {key} = {shown(value)} is not a JSON object")
    return value


def shown(value: object) -> str:
    """VALUE as config.json had it, cut short: a hostile file's strings can be megabytes."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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

    args: TrunkArgs  # the family's hyper-parameters, parsed once from config.json

    def __init__(self, config: dict, where: str) -> None:
        self.where = where
        # Causal attention (Qwen3-Embedding, e5-mistral) or bidirectional (the default: nemotron, gte-Qwen2).
        self.causal = False

    def hold(self, args: TrunkArgs) -> None:
        """Keep ARGS, and llama.cpp's tensor-name map for as many layers."""
        self.args = args
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, args.num_hidden_layers)

    # --- what the planner reads -----------------------------------------------------------------
    @property
    def trunk(self) -> Trunk:
        return self.args.trunk

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


class Decoder(Family):
    """A pre-norm decoder trunk (llama, Mistral, Qwen): rope, RMS norms, grouped KV heads; its Args are
    DecoderArgs."""

    args: DecoderArgs

    def attention_extras(self, block: str) -> list[TensorSpec]:
        """The family's own attention tensors of one layer (biases, q/k norms)."""
        return []

    def tensor_specs(self) -> tuple[TensorSpec, ...]:
        a = self.args
        hidden, ffn = a.hidden_size, a.intermediate_size
        q_rows, kv_rows = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        specs = [
            TensorSpec("token_embd.weight", (a.vocab_size, hidden), F16),
            TensorSpec("output_norm.weight", (hidden,), F32),
        ]
        specs += [TensorSpec(name, data.shape, F32) for name, data in self.extra_tensors()]
        for i in range(a.num_hidden_layers):
            specs += decoder_layer_specs(i, hidden, ffn, q_rows, kv_rows, tuple(self.attention_extras(f"blk.{i}.")))
        return tuple(specs)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        a = self.args
        w.add_head_count_kv(a.num_key_value_heads)
        w.add_layer_norm_rms_eps(a.rms_norm_eps)
        w.add_rope_freq_base(a.rope_theta)
        w.add_rope_dimension_count(a.head_dim)

    def gguf_name(self, hf_name: str) -> str | None:
        # lm_head: a causal LM's output layer, no part of an embedder (Qwen3-Embedding ships without one);
        # llama.cpp computes the rotary tables itself.
        if hf_name.endswith("rotary_emb.inv_freq") or hf_name == "lm_head.weight":
            return None
        return map_tensor(self.tensor_map, "model." + hf_name.removeprefix("model."), hf_name)


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


def for_config(config: object, embedder: bool, where: str, causal: bool = False) -> Family:
    """The family for CONFIG; causal LMs only when the caller declared them as embedders.

    CAUSAL: run attention causally (last-token embedders trained that way); the default is bidirectional.
    """
    if not isinstance(config, dict):
        raise CorruptModelFile(f"{where}: config.json holds {type(config).__name__}, not a JSON object")
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else "<missing>"
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
