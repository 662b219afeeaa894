"""BERT encoders (all-MiniLM-L6-v2 and kin): GGUF arch `bert`, WordPiece vocabulary, CLS or mean pooling."""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np

from quantize.architectures import add_trunk_shape, map_tensor, register
from quantize.errors import UnsupportedArchitecture

# Checkpoint tensors with no role in embedding: the NSP/MLM heads and the pooler.
_UNUSED = ("embeddings.position_ids", "pooler.", "cls.")


@register("BertModel")
class Bert:
    gguf_arch = gguf.MODEL_ARCH.BERT
    keep_f32 = ("position_embd.weight", "token_types.weight")

    def __init__(self, config: dict, where: str) -> None:
        try:
            self.hidden = config["hidden_size"]
            self.n_layers = config["num_hidden_layers"]
            self.n_head = config["num_attention_heads"]
            self.ffn = config["intermediate_size"]
            self.vocab_size = config["vocab_size"]
        except KeyError as e:
            raise UnsupportedArchitecture(f"{where}: config.json lacks {e.args[0]!r}") from None
        self.eps = config.get("layer_norm_eps", 1e-12)
        self.context = config.get("max_position_embeddings", 512)
        self.type_vocab_size = config.get("type_vocab_size", 2)
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedArchitecture(f"{where}: only absolute position embeddings are supported for BERT")
        if config.get("hidden_act", "gelu") != "gelu":
            raise UnsupportedArchitecture(f"{where}: hidden_act {config['hidden_act']!r}; llama.cpp's bert needs gelu")
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        add_trunk_shape(
            w, context=self.context, hidden=self.hidden, layers=self.n_layers, ffn=self.ffn, heads=self.n_head
        )
        w.add_layer_norm_eps(self.eps)
        w.add_token_type_count(self.type_vocab_size)

    def gguf_name(self, hf_name: str) -> str | None:
        name = hf_name.removeprefix("bert.")
        if name.startswith(_UNUSED):
            return None
        name = name.removesuffix(".gamma") + ".weight" if name.endswith(".gamma") else name
        name = name.removesuffix(".beta") + ".bias" if name.endswith(".beta") else name
        return map_tensor(self.tensor_map, name, hf_name)

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        return data

    def extra_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(())
