"""A model's shapes, wherever they can be had: a GGUF (exact), a config.json, or models.toml (before download).

The planner needs nothing else: no weights, no network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from quantize import gguf_keys
from quantize.errors import BadInput, ModelNotFound
from quantize.files import models_home
from quantize.gguf_header import read_header
from quantize.registry import load_registry
from quantize.sizes import TensorSpec
from quantize.source import package_dir

F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
HEADER_BYTES_PER_TOKEN = 48  # GGUF header bytes per vocabulary entry (measured: Llama-3 61, SmolLM2 36)


@dataclass(frozen=True)
class ModelShape:
    name: str
    arch: str  # GGUF architecture: llama-embed or bert
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    context: int  # longest sequence the model was trained for
    tensors: tuple[TensorSpec, ...]  # as in the F16 GGUF
    header_bytes: int
    head_bytes: int = 0  # NV-Embed's latent-attention head, float32 in RAM
    per_token_outputs: bool = False  # pooling none: llama.cpp returns every token's state
    exact: bool = False  # tensors and header read from a GGUF rather than derived

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_gqa(self) -> int:
        return self.heads // max(1, self.kv_heads)


def llama_tensors(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int, rope_freqs: bool):
    hd = hidden // heads
    specs = [TensorSpec("token_embd.weight", (vocab, hidden), F16), TensorSpec("output_norm.weight", (hidden,), F32)]
    if rope_freqs:
        specs.append(TensorSpec("rope_freqs.weight", (hd // 2,), F32))
    for i in range(layers):
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (hidden,), F32),
            TensorSpec(b + "attn_q.weight", (heads * hd, hidden), F16),
            TensorSpec(b + "attn_k.weight", (kv_heads * hd, hidden), F16),
            TensorSpec(b + "attn_v.weight", (kv_heads * hd, hidden), F16),
            TensorSpec(b + "attn_output.weight", (hidden, heads * hd), F16),
            TensorSpec(b + "ffn_norm.weight", (hidden,), F32),
            TensorSpec(b + "ffn_gate.weight", (ffn, hidden), F16),
            TensorSpec(b + "ffn_up.weight", (ffn, hidden), F16),
            TensorSpec(b + "ffn_down.weight", (hidden, ffn), F16),
        ]
    return tuple(specs)


def bert_tensors(layers: int, hidden: int, ffn: int, vocab: int, positions: int, types: int):
    specs = [
        TensorSpec("token_embd.weight", (vocab, hidden), F16),
        TensorSpec("position_embd.weight", (positions, hidden), F32),
        TensorSpec("token_types.weight", (types, hidden), F32),
        TensorSpec("token_embd_norm.weight", (hidden,), F32),
        TensorSpec("token_embd_norm.bias", (hidden,), F32),
    ]
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden)}
    shapes |= {"attn_output": (hidden, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    for i in range(layers):
        for name, shape in shapes.items():
            specs += [
                TensorSpec(f"blk.{i}.{name}.weight", shape, F16),
                TensorSpec(f"blk.{i}.{name}.bias", shape[:1], F32),
            ]
        for norm in ("attn_output_norm", "layer_output_norm"):
            specs += [TensorSpec(f"blk.{i}.{norm}.{p}", (hidden,), F32) for p in ("weight", "bias")]
    return tuple(specs)


def head_bytes(hidden: int, latent: dict) -> int:
    """NV-Embed's folded head in float32: scores + values (hidden x heads*latents each), GEGLU, norms."""
    hl = int(latent.get("num_cross_heads", 8)) * int(latent.get("num_latents_value", 512))
    return 4 * (2 * hidden * hl + 8 * hidden * hidden + 4 * hidden * hidden + 8 * hidden + 5 * hidden)


def from_config(name: str, config: dict) -> ModelShape:
    """Shapes from an HF config.json (LlamaBidirectionalModel, Llama/Mistral, NVEmbedModel)."""
    arch = (config.get("architectures") or ["?"])[0]
    nv = arch == "NVEmbedModel"
    text = {**_MISTRAL, **config["text_config"]} if nv else config
    try:
        if arch == "BertModel":
            return _bert(name, config)
        layers, hidden, ffn = text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"]
        heads, vocab = text["num_attention_heads"], text["vocab_size"]
    except KeyError as e:
        raise BadInput(f"{name}: config.json lacks {e}; cannot plan without the model's shapes") from None
    kv = text.get("num_key_value_heads") or heads
    rope = {**(text.get("rope_parameters") or {}), **(text.get("rope_scaling") or {})}
    llama3 = (rope.get("rope_type") or rope.get("type")) == "llama3"
    return ModelShape(
        name=name,
        arch="llama-embed",
        layers=layers,
        hidden=hidden,
        ffn=ffn,
        heads=heads,
        kv_heads=kv,
        vocab=vocab,
        context=text.get("max_position_embeddings", 4096),
        tensors=llama_tensors(layers, hidden, ffn, heads, kv, vocab, llama3),
        header_bytes=HEADER_BYTES_PER_TOKEN * vocab + 2**16,
        head_bytes=head_bytes(hidden, config.get("latent_attention_config") or {}) if nv else 0,
        per_token_outputs=nv,
    )


def _bert(name: str, c: dict) -> ModelShape:
    layers, hidden, ffn, vocab = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    positions = c.get("max_position_embeddings", 512)
    return ModelShape(
        name=name,
        arch="bert",
        layers=layers,
        hidden=hidden,
        ffn=ffn,
        heads=c["num_attention_heads"],
        kv_heads=c["num_attention_heads"],
        vocab=vocab,
        context=positions,
        tensors=bert_tensors(layers, hidden, ffn, vocab, positions, c.get("type_vocab_size", 2)),
        # WordPiece vocab plus the HF tokenizer.json we carry: 36 bytes per token measured for MiniLM
        header_bytes=36 * vocab + 2**16,
    )


_MISTRAL = {"vocab_size": 32000, "max_position_embeddings": 32768, "num_key_value_heads": 8}


def from_gguf(path: Path) -> ModelShape:
    """Exact shapes from a GGUF file (any quant: the F16 layout is rebuilt from the tensor shapes)."""
    header = read_header(path)
    fields = header.metadata
    arch = str(fields["general.architecture"])
    specs = [TensorSpec(name, shape, qtype) for name, shape, qtype in header.tensors]
    # Whatever the file's quant, plan from the F16 layout it was made from.
    f16 = tuple(TensorSpec(t.name, t.shape, F32 if t.type == F32 or len(t.shape) < 2 else F16) for t in specs)
    heads = int(fields[f"{arch}.attention.head_count"])
    head = 0
    if fields.get(gguf_keys.HEAD_FILE):
        sidecar = path.parent / str(fields[gguf_keys.HEAD_FILE])
        head = sidecar.stat().st_size if sidecar.is_file() else 0
    vocab = header.array_lengths["tokenizer.ggml.tokens"]
    return ModelShape(
        name=str(fields.get("general.name", path.stem)),
        arch=arch,
        layers=int(fields[f"{arch}.block_count"]),
        hidden=int(fields[f"{arch}.embedding_length"]),
        ffn=int(fields[f"{arch}.feed_forward_length"]),
        heads=heads,
        kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", heads)),
        vocab=vocab,
        context=int(fields[f"{arch}.context_length"]),
        tensors=f16,
        header_bytes=header.data_offset,
        head_bytes=head,
        per_token_outputs=fields.get(gguf_keys.POOLING) == "latent-attention",
        exact=True,
    )


def resolve_shape(model: str) -> ModelShape:
    """-m MODEL: a GGUF, a directory (of GGUFs, or an HF checkpoint: config.json is enough), a registry name."""
    path = Path(model).expanduser()
    if path.is_file():
        return from_gguf(path)
    if path.is_dir():
        if ggufs := _ggufs(path):
            return from_gguf(ggufs[0])
        if (path / "config.json").is_file():
            return from_config(path.name, json.loads((path / "config.json").read_text()))
        raise ModelNotFound(f"{model}: no GGUF files and no config.json here")
    registry = load_registry()
    if model not in registry:
        raise ModelNotFound(f"{model}: no such file, directory or registry name; known: {', '.join(sorted(registry))}")
    if ggufs := _ggufs(models_home() / model):
        return from_gguf(ggufs[0])
    entry = registry[model]
    if entry.package:
        return from_config(model, json.loads((package_dir(entry.package) / "config.json").read_text()))
    if entry.shape is None:
        raise BadInput(f"{model}: models.toml has no [{model}.shape] table and nothing is on disk; convert it first")
    return from_config(model, entry.config())


def _ggufs(directory: Path) -> list[Path]:
    """Trunk GGUFs in DIRECTORY, F16 first (the exact layout), sidecars left out."""
    files = [p for p in sorted(directory.glob("*.gguf")) if not p.name.endswith(".head.gguf")]
    return sorted(files, key=lambda p: (not p.stem.endswith("-F16"), p.name))


def file_quant(path: Path) -> str:
    """The quant of a GGUF file (Q4_K_M, F16, ...) from its general.file_type."""
    ftype = read_header(path).metadata.get("general.file_type")
    if ftype is None:
        return "F16"
    name = gguf.LlamaFileType(int(ftype)).name
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
