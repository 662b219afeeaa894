"""Exact GGUF bytes for each quant, from tensor shapes alone, with llama.cpp's per-tensor type rules.

The rules are those of `llama_tensor_get_type` in the vendored llama.cpp (src/llama-quant.cpp,
llama-cpp-python 0.3.36), for the ftypes of our ladder and dense (non-expert, non-Falcon) models:

- only 2-D tensors whose name ends in `weight` are quantized, never `*_norm.weight`, nor BERT's
  position and token-type embeddings; the rest keep the type they have in the F16 file;
- with no `output.weight` (embedders have no LM head) `token_embd` is quantized like the output tensor:
  Q8_0 when the ftype's base type is Q8_0 or its rows do not divide into blocks, else Q6_K;
- attn_v: Q2_K -> Q4_K when n_head/n_head_kv >= 4 else Q3_K; Q3_K_M -> Q5_K for the first two
  layers then Q4_K; Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K on "more bits" layers; Q4_K_S -> Q5_K for
  the first four layers;
- ffn_down: Q2_K -> Q3_K; Q3_K_M -> Q5_K below n_layer/16, else Q4_K; Q3_K_L -> Q5_K;
  Q4_K_M/Q5_K_M -> Q6_K on "more bits" layers; Q4_K_S -> Q5_K below n_layer/8;
- attn_output: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K;
- a row length not divisible by the type's block falls back: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 if that does not divide either.

The i-quants (IQ4_XS, IQ3_M, IQ3_XXS, IQ2_M), as quantized here: always with an importance matrix:

- base types IQ4_XS, IQ3_S (IQ3_M), IQ3_XXS, IQ2_S (IQ2_M); token_embd as the output tensor: Q5_K for
  IQ3_XXS and IQ2_M, Q6_K for IQ4_XS and IQ3_M;
- IQ4_XS: attn_v -> Q5_K when n_head/n_head_kv >= 4;
- IQ3_M: attn_v and attn_output -> Q4_K, ffn_down -> Q4_K below n_layer/8;
- IQ3_XXS: attn_v -> Q4_K when n_head/n_head_kv >= 4; attn_q and attn_k -> IQ2_S; attn_output -> IQ3_S;
- IQ2_M: attn_v -> Q4_K when n_head/n_head_kv >= 4 else IQ3_S; ffn_down below n_layer/8 and attn_output ->
  IQ3_S;
- a row not divisible by 256 falls back to IQ4_NL (blocks of 32), then F16.

"More bits" layers: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2. Each tensor's data is padded to the
file's alignment (32 bytes); the header (metadata, tokenizer, tensor index) is the F16 file's, plus the keys a
quant made with an importance matrix or tensor-type overrides records (`data_offset_with`; under 1 KiB).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

from quantize.gguf_header import read_header
from quantize.quants import RAISED_TENSORS

Q = gguf.GGMLQuantizationType
ALIGNMENT = 32
# The ftype's base type (llama_ftype_get_default_type).
BASE_TYPE = {
    "F32": Q.F32,
    "F16": Q.F16,
    "BF16": Q.BF16,
    "Q8_0": Q.Q8_0,
    "Q6_K": Q.Q6_K,
    "Q5_K_M": Q.Q5_K,
    "Q5_K_S": Q.Q5_K,
    "Q4_K_M": Q.Q4_K,
    "Q4_K_S": Q.Q4_K,
    "Q3_K_L": Q.Q3_K,
    "Q3_K_M": Q.Q3_K,
    "Q3_K_S": Q.Q3_K,
    "Q2_K": Q.Q2_K,
    "IQ4_XS": Q.IQ4_XS,
    "IQ3_M": Q.IQ3_S,
    "IQ3_XXS": Q.IQ3_XXS,
    "IQ2_M": Q.IQ2_S,
}
FALLBACK = {
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
    Q.IQ4_XS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL, Q.IQ3_XXS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL,
}  # fmt: skip
# attn_output's type where it differs from the base type.
ATTN_OUTPUT = {
    "Q2_K": Q.Q3_K, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K, "IQ3_XXS": Q.IQ3_S, "IQ3_M": Q.Q4_K, "IQ2_M": Q.IQ3_S,
}  # fmt: skip
# The output tensor (token_embd in a model without one) of the i-quants whose ftype llama.cpp lists for Q5_K.
OUTPUT_Q5_K = ("IQ3_XXS", "IQ2_M")
NEVER_QUANTIZED = ("position_embd.weight", "token_types.weight")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: rows first; the last entry is llama.cpp's ne[0] (row length)
    type: gguf.GGMLQuantizationType  # its type in the F16/F32 file

    @property
    def row(self) -> int:
        return self.shape[-1]


def nbytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * (shape[-1] // block) * size


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _blocks_fit(qtype: gguf.GGMLQuantizationType, row: int) -> bool:
    return row % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def tensor_types(
    tensors: list[TensorSpec],
    quant: str,
    n_layers: int,
    n_gqa: int,
    overrides: Sequence[tuple[str, str]] = (),
    stock: bool = False,
) -> dict[str, gguf.GGMLQuantizationType]:
    """The type llama.cpp's quantizer gives each tensor for QUANT (an ftype name: Q4_K_M, F16, ...).

    OVERRIDES, (regex, type name) pairs as quantize.ladder's `tensor_types`, then the quant's RAISED_TENSORS rule
    (unless STOCK: llama.cpp's own mix), come first for every tensor it quantizes: the first regex found in the
    name gives the type (then the row fallback). A tensor so given its type skips the ftype's rules and does not
    count in their attn_v / ffn_down layer numbering, as in llama.cpp.
    """
    base = BASE_TYPE[quant]
    rule = () if stock else RAISED_TENSORS.get(quant, ())
    manual = [(re.compile(rx), Q[name.upper()]) for rx, name in [*overrides, *rule]]
    if base in (Q.F32, Q.F16, Q.BF16):
        return {t.name: (t.type if len(t.shape) < 2 or t.type == Q.F32 else base) for t in tensors}
    # llama.cpp visits tensors by layer number (non-layer tensors first), then name.
    order = sorted(tensors, key=lambda t: (_layer(t.name), t.name))
    has_output = any(t.name == "output.weight" for t in tensors)
    n_attn_v = sum("attn_v.weight" in t.name or "attn_qkv.weight" in t.name for t in tensors)
    i_attn_v = i_ffn_down = 0
    out: dict[str, gguf.GGMLQuantizationType] = {}
    for t in order:
        name = t.name
        if len(t.shape) < 2 or not name.endswith("weight") or "_norm.weight" in name or name in NEVER_QUANTIZED:
            out[name] = t.type
            continue
        new = base
        if (forced := next((qtype for rx, qtype in manual if rx.search(name)), None)) is not None:
            new = forced
        elif name == "output.weight" or (name == "token_embd.weight" and not has_output):
            if not _blocks_fit(base, t.row) or base == Q.Q8_0:
                new = Q.Q8_0
            else:
                new = Q.Q5_K if quant in OUTPUT_Q5_K else Q.Q6_K
        elif "attn_v.weight" in name or "attn_qkv.weight" in name:
            i = i_attn_v
            if quant in ("IQ2_M", "IQ3_XXS"):
                new = Q.Q4_K if n_gqa >= 4 else (Q.IQ3_S if quant == "IQ2_M" else Q.IQ3_XXS)
            elif quant == "IQ3_M":
                new = Q.Q4_K
            elif quant == "IQ4_XS" and n_gqa >= 4:
                new = Q.Q5_K
            elif quant == "Q2_K":
                new = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
            elif quant == "Q3_K_M":
                new = Q.Q5_K if i < 2 else Q.Q4_K
            elif quant == "Q3_K_L":
                new = Q.Q5_K
            elif quant in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_attn_v):
                new = Q.Q6_K
            elif quant == "Q4_K_S" and i < 4:
                new = Q.Q5_K
            i_attn_v += 1
        elif "ffn_down" in name:
            i = i_ffn_down
            if quant == "IQ2_M" and i < n_layers // 8:
                new = Q.IQ3_S
            elif quant == "IQ3_M" and i < n_layers // 8:
                new = Q.Q4_K
            elif quant == "Q2_K":
                new = Q.Q3_K
            elif quant == "Q3_K_M":
                new = Q.Q5_K if i < n_layers // 16 else Q.Q4_K
            elif quant == "Q3_K_L":
                new = Q.Q5_K
            elif quant in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_layers):
                new = Q.Q6_K
            elif quant == "Q4_K_S" and i < n_layers // 8:
                new = Q.Q5_K
            i_ffn_down += 1
        elif "attn_output.weight" in name:
            new = ATTN_OUTPUT.get(quant, base)
        elif quant == "IQ3_XXS" and ("attn_q.weight" in name or "attn_k.weight" in name):
            new = Q.IQ2_S
        if not _blocks_fit(new, t.row):
            new = FALLBACK.get(new, new)
            if not _blocks_fit(new, t.row):
                new = Q.F16
        out[name] = new
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() else -1


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def file_bytes(
    tensors: list[TensorSpec],
    quant: str,
    header_bytes: int,
    n_layers: int,
    n_gqa: int,
    overrides: Sequence[tuple[str, str]] = (),
    stock: bool = False,
) -> int:
    types = tensor_types(tensors, quant, n_layers, n_gqa, overrides, stock)
    return header_bytes + sum(_pad(nbytes(types[t.name], t.shape)) for t in tensors)


def layer_bytes(tensors: list[TensorSpec], quant: str, n_layers: int, n_gqa: int) -> tuple[list[int], int]:
    """(bytes of each repeating layer, bytes outside the layers) for QUANT."""
    types = tensor_types(tensors, quant, n_layers, n_gqa)
    per_layer = [0] * n_layers
    other = 0
    for t in tensors:
        size = _pad(nbytes(types[t.name], t.shape))
        i = _layer(t.name)
        if 0 <= i < n_layers:
            per_layer[i] += size
        else:
            other += size
    return per_layer, other


def data_offset_with(path: Path, added: Mapping[str, str | int]) -> int:
    """Where tensor data starts in a quant of the GGUF PATH that carries the ADDED metadata keys too (string and
    uint32 values; quantize.imatrix.key_values): a quant made with an importance matrix records it in the file."""
    end = read_header(path).header_end
    for key, value in added.items():
        end += 8 + len(key.encode()) + 4 + (4 if isinstance(value, int) else 8 + len(str(value).encode()))
    return _pad(end)


def read_tensors(path: Path) -> tuple[list[TensorSpec], int]:
    """The tensors of a GGUF file and its header size (where tensor data starts)."""
    header = read_header(path)
    return [TensorSpec(name, shape, qtype) for name, shape, qtype in header.tensors], header.data_offset
