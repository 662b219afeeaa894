"""A model's shapes, wherever they can be had: a GGUF (exact), a config.json, or models.toml (before download).

The planner needs nothing else: no weights, no network. What a config.json means is the model family's
business (quantize/architectures/): this module asks the family class and never parses config.json itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from quantize import gguf_keys
from quantize.architectures import for_config
from quantize.errors import BadInput, CorruptModelFile, ModelNotFound
from quantize.gguf_check import check_gguf
from quantize.manifest import read_metadata
from quantize.quants import PLANNED
from quantize.reference import Kind, ModelRef
from quantize.sizes import TensorSpec
from quantize.source import package_dir, read_config, weights_dtype

F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
HEADER_SLACK = 2**16  # general.* keys, prompts, the tensor index: beyond the per-token vocabulary bytes


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
    mean_pooling: bool = True  # llama.cpp averages (its compute buffer holds the matrix); known once in a GGUF
    max_length: int | None = None  # the default input length a converted file records (registry's)
    key_length: int | None = None  # per-head width when it is not hidden / heads (Qwen3-0.6B, 4B)
    # The published weights' type, config.json's torch_dtype (bfloat16, float16, float32; a GGUF records it from its
    # conversion); None: not known (models.toml's shape tables). A bfloat16 model makes BF16 a candidate.
    dtype: str | None = None

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.heads

    @property
    def n_gqa(self) -> int:
        return self.heads // max(1, self.kv_heads)


def from_config(name: str, config: dict) -> ModelShape:
    """Shapes from an HF config.json, through the family class that converts it."""
    family = for_config(config, embedder=True, where=name)
    t = family.trunk
    return ModelShape(
        name=name,
        arch=gguf.MODEL_ARCH_NAMES[family.gguf_arch],
        layers=t.layers,
        hidden=t.hidden,
        ffn=t.ffn,
        heads=t.heads,
        kv_heads=t.kv_heads,
        vocab=t.vocab,
        context=t.context,
        tensors=family.tensor_specs(),
        header_bytes=family.header_bytes_per_token * t.vocab + HEADER_SLACK,
        head_bytes=family.head_bytes(),
        per_token_outputs=family.per_token_outputs,
        key_length=t.head_dim,
        dtype=weights_dtype(config),
    )


def from_gguf(path: Path) -> ModelShape:
    """Exact shapes from a GGUF file (any quant: the F16 layout is rebuilt from the tensor shapes)."""
    # A one-line CorruptModelFile for a file that is not a GGUF, or whose hyper-parameters do not match its tensors.
    header = check_gguf(path)
    fields = header.metadata
    arch = str(fields.get("general.architecture", "?"))

    def need(key: str) -> int:
        value = fields.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CorruptModelFile(f"{path}: GGUF key {key} is missing or not a positive integer; re-convert it")
        return value

    # Whatever the file's quant, plan from the F16 layout it was made from.
    f16 = tuple(TensorSpec(n, s, F32 if t == F32 or len(s) < 2 else F16) for n, s, t in header.tensors)
    heads = need(f"{arch}.attention.head_count")
    head = 0
    name = fields.get(gguf_keys.HEAD_FILE)
    if name:
        sidecar = path.parent / str(name)
        head = sidecar.stat().st_size if Path(str(name)).name == name and sidecar.is_file() else 0
    vocab = header.array_lengths.get("tokenizer.ggml.tokens")
    if not vocab:
        raise CorruptModelFile(f"{path}: no tokenizer.ggml.tokens vocabulary; re-convert it")
    return ModelShape(
        name=str(fields.get("general.name", path.stem)),
        arch=arch,
        layers=need(f"{arch}.block_count"),
        hidden=need(f"{arch}.embedding_length"),
        ffn=need(f"{arch}.feed_forward_length"),
        heads=heads,
        kv_heads=need(f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv" in fields else heads,
        vocab=vocab,
        context=need(f"{arch}.context_length"),
        tensors=f16,
        header_bytes=header.data_offset,
        head_bytes=head,
        per_token_outputs=fields.get(gguf_keys.POOLING) == "latent-attention",
        mean_pooling=fields.get(f"{arch}.pooling_type", gguf.PoolingType.MEAN) == gguf.PoolingType.MEAN,
        max_length=int(fields[gguf_keys.MAX_LENGTH]) if isinstance(fields.get(gguf_keys.MAX_LENGTH), int) else None,
        key_length=fields.get(f"{arch}.attention.key_length"),
        dtype=dtype if isinstance(dtype := fields.get(gguf_keys.SOURCE_DTYPE), str) else None,
    )


def resolve_shape(model: str | ModelRef) -> ModelShape:
    """-m MODEL (quantize.reference): a GGUF, a model directory of GGUFs, an HF checkpoint (config.json is
    enough), a registry name (its GGUFs once on disk, else its package's or models.toml's shapes) or a hub repo
    id (its config.json: from the Hugging Face cache, else a few kB from the hub)."""
    ref = ModelRef.parse(model)
    if ref.kind is Kind.GGUF:
        return from_gguf(ref.path)
    if ref.kind is Kind.CHECKPOINT:
        return from_config(ref.path.name, read_config(ref.path))
    if ref.kind is Kind.HUB:
        config = hub_config(ref.text, None)
        if config is None:
            raise ModelNotFound(
                f"{ref}: no config.json from the hub nor the Hugging Face cache (no such repo, a gated one: "
                "`hf auth login`, or offline: HF_HUB_OFFLINE, no network); or pass a local directory"
            )
        return from_config(ref.text, config)
    if ggufs := _ggufs(ref.path if ref.kind is Kind.STORE else ref.home):
        return from_gguf(ggufs[0])
    if ref.kind is Kind.STORE:
        raise ModelNotFound(f"{ref}: no GGUF files and no config.json here")
    entry = ref.entry
    if entry.package:
        return from_config(ref.text, read_config(package_dir(entry.package)))
    if entry.shape is None:
        raise BadInput(f"{ref}: models.toml has no [{ref}.shape] table and nothing is on disk; convert it first")
    return from_config(ref.text, entry.config())


def hub_config(repo: str, revision: str | None) -> dict | None:
    """config.json of a hub repo (a few kB into the Hugging Face cache), or None when it cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        return read_config(Path(hf_hub_download(repo, "config.json", revision=revision)).parent)
    except (OSError, ValueError):
        return None


def _ggufs(directory: Path) -> list[Path]:
    """Trunk GGUFs in DIRECTORY, BF16 then F16 first (the exact layout), sidecars left out."""
    files = [p for p in sorted(directory.glob("*.gguf")) if not p.name.endswith(".head.gguf")]
    return sorted(files, key=lambda p: (not p.stem.endswith(("-F16", "-BF16")), p.name))


def file_quant(path: Path) -> str:
    """The quant of a GGUF file (Q4_K_M, F16, ...) from its general.file_type."""
    ftype = read_metadata(path).get("general.file_type")
    if ftype is None:
        return "F16"
    try:
        name = gguf.LlamaFileType(int(ftype)).name
    except (ValueError, TypeError):
        raise CorruptModelFile(f"{path}: general.file_type {ftype!r} is not a llama.cpp file type") from None
    quant = name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if quant not in PLANNED:  # named here: left to the policy, it read as a --quant the user never gave
        raise BadInput(f"{path}: a {quant} file; the planner sizes {', '.join(PLANNED)} (runner embed runs it as is)")
    return quant
