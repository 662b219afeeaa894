"""BERT encoders (all-MiniLM-L6-v2 and kin): GGUF arch `bert`, WordPiece vocabulary, CLS or mean pooling."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from quantize.architectures import (
    F16,
    F32,
    MAX_VOCAB,
    Family,
    Trunk,
    TrunkArgs,
    integer,
    map_tensor,
    number,
    register,
    shown,
)
from quantize.errors import UnsupportedArchitecture
from quantize.sizes import TensorSpec

# Checkpoint tensors with no role in embedding: the NSP/MLM heads and the pooler.
_UNUSED = ("embeddings.position_ids", "pooler.", "cls.")


@dataclass(frozen=True)
class BertArgs(TrunkArgs):
    max_position_embeddings: int
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2

    @classmethod
    def from_config(cls, config: dict, where: str) -> BertArgs:
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedArchitecture(f"{where}: only absolute position embeddings are supported for BERT")
        if config.get("hidden_act", "gelu") != "gelu":
            raise UnsupportedArchitecture(
                f"{where}: hidden_act {shown(config['hidden_act'])}; llama.cpp's bert needs gelu"
            )
        t = Trunk.from_config(config, where, context=512)
        if t.hidden % t.heads:
            raise UnsupportedArchitecture(f"{where}: hidden_size {t.hidden} does not divide into {t.heads} heads")
        return cls(
            **TrunkArgs.sizes(t),
            layer_norm_eps=number(config, "layer_norm_eps", where, 1e-12, hi=1.0),
            max_position_embeddings=t.context,
            type_vocab_size=integer(config, "type_vocab_size", where, 1, MAX_VOCAB, default=2),
        )


@register("BertModel")
class Bert(Family):
    gguf_arch = gguf.MODEL_ARCH.BERT
    keep_f32 = ("position_embd.weight", "token_types.weight")
    header_bytes_per_token = 36  # WordPiece vocab plus the HF tokenizer.json we carry (measured for MiniLM)
    can_be_causal = False

    def __init__(self, config: dict, where: str) -> None:
        super().__init__(config, where)
        self.hold(BertArgs.from_config(config, where))

    def tensor_specs(self) -> tuple[TensorSpec, ...]:
        a, hidden, ffn = self.args, self.args.hidden_size, self.args.intermediate_size
        specs = [
            TensorSpec("token_embd.weight", (a.vocab_size, hidden), F16),
            TensorSpec("position_embd.weight", (a.max_position_embeddings, hidden), F32),
            TensorSpec("token_types.weight", (a.type_vocab_size, hidden), F32),
            TensorSpec("token_embd_norm.weight", (hidden,), F32),
            TensorSpec("token_embd_norm.bias", (hidden,), F32),
        ]
        shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden)}
        shapes |= {"attn_output": (hidden, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
        for i in range(a.num_hidden_layers):
            for name, shape in shapes.items():
                specs += [
                    TensorSpec(f"blk.{i}.{name}.weight", shape, F16),
                    TensorSpec(f"blk.{i}.{name}.bias", shape[:1], F32),
                ]
            for norm in ("attn_output_norm", "layer_output_norm"):
                specs += [TensorSpec(f"blk.{i}.{norm}.{p}", (hidden,), F32) for p in ("weight", "bias")]
        return tuple(specs)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_layer_norm_eps(self.args.layer_norm_eps)
        w.add_token_type_count(self.args.type_vocab_size)

    def gguf_name(self, hf_name: str) -> str | None:
        name = hf_name.removeprefix("bert.")
        if name.startswith(_UNUSED):
            return None
        name = name.removesuffix(".gamma") + ".weight" if name.endswith(".gamma") else name
        name = name.removesuffix(".beta") + ".bias" if name.endswith(".beta") else name
        return map_tensor(self.tensor_map, name, hf_name)
