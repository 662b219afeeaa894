"""Synthesized models for the tests, the benches and the GPU check.

- `build_checkpoint`: a random Hugging Face checkpoint of any family the converter supports, saved as the
  published ones are (safetensors, config.json, the tokenizer's files), from a 2-layer toy to the 8B shape.
  Tensor names and shapes come from transformers' own model class (built on the meta device, so no memory);
  the values are drawn one shard at a time, so building 16 GB holds at most one 2 GB shard.
- `synthesize` / `cut_layers`: GGUFs written from one our converter made: stretched to any depth and quant
  (random blocks of the type llama.cpp's quantizer would give each tensor), or cut to its first layers (real
  weights kept byte for byte). `model_files` makes the Llama-3.1-8B-shaped set the GPU check measures.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    Tensor = tuple[str, tuple[int, ...], int, np.ndarray]  # name, numpy shape, ggml type, the bytes

GIB = 2**30
SHARD_BYTES = 2 * 10**9
DTYPES = ("f32", "f16", "bf16")
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# config.json architecture -> (transformers config class, the model class whose state_dict names the tensors,
# what the family's published configs set that the toys keep).
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "LlamaBidirectionalModel": ("LlamaConfig", "LlamaModel", {}),
    "LlamaModel": ("LlamaConfig", "LlamaModel", {}),
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM", {}),
    "MistralModel": ("MistralConfig", "MistralModel", dict(sliding_window=None)),
    "NVEmbedModel": ("MistralConfig", "MistralModel", dict(sliding_window=None)),  # the trunk; the head is added
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6, rms_norm_eps=1e-6)),
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1e6, rms_norm_eps=1e-6)),
}
NVEMBED_TRUNK, NVEMBED_HEAD = "embedding_model.", "latent_attention_model."


@dataclass(frozen=True)
class LatentHead:
    """The sizes of NV-Embed's latent-attention head (the published one: 512 latents, 8 heads of 4096)."""

    latents: int = 32
    cross_heads: int = 2
    cross_dim_head: int = 128

    def shapes(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """Its tensors in the published layout (cross-attention block 0, GEGLU feed-forward block 1)."""
        inner = self.cross_heads * self.cross_dim_head
        blocks = "cross_attend_blocks"
        return {
            "latents": (self.latents, hidden),
            **{f"{blocks}.0.{n}.{p}": (hidden,) for n in ("norm", "norm_context") for p in ("weight", "bias")},
            f"{blocks}.0.fn.to_q.weight": (inner, hidden),
            f"{blocks}.0.fn.to_kv.weight": (2 * inner, hidden),
            f"{blocks}.0.fn.to_out.weight": (hidden, inner),
            **{f"{blocks}.1.norm.{p}": (hidden,) for p in ("weight", "bias")},
            f"{blocks}.1.fn.net.0.weight": (8 * hidden, hidden),
            f"{blocks}.1.fn.net.0.bias": (8 * hidden,),
            f"{blocks}.1.fn.net.2.weight": (hidden, 4 * hidden),
            f"{blocks}.1.fn.net.2.bias": (hidden,),
        }


def llama3_shape(hidden: int = 4096, ffn: int = 14336, vocab: int = 128256) -> dict:
    """`build_checkpoint` options of a Llama-3 trunk (llama-embed-nemotron-8b's at the defaults): heads of 128,
    at most 8 KV heads, Llama-3.1 rope scaling, Llama-3's special tokens, the published initializer range."""
    heads = hidden // 128
    return dict(
        hidden=hidden,
        ffn=ffn,
        vocab=vocab,
        heads=heads,
        kv_heads=min(8, heads),
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def hf_config(
    architecture: str,
    *,
    vocab: int,
    layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 768,
    rope_theta: float | None = None,
    rope_scaling: dict | None = None,
    **config: object,
):
    """The transformers config of ARCHITECTURE's trunk at this size; CONFIG sets any other key (head_dim,
    rms_norm_eps, max_position_embeddings, initializer_range, ...)."""
    import transformers

    if architecture not in FAMILIES:
        raise ValueError(f"no builder for {architecture!r} (one of {', '.join(FAMILIES)})")
    config_class, _, family = FAMILIES[architecture]
    values = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        initializer_range=0.05,
        tie_word_embeddings=False,
    )
    values.update(family)
    family_theta = values.pop("rope_theta", 10000.0)
    theta = family_theta if rope_theta is None else rope_theta
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})}
    values.update(config)
    return getattr(transformers, config_class)(**values)


def tensor_shapes(architecture: str, config, head: LatentHead | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of ARCHITECTURE's checkpoint, in the order transformers saves them."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, FAMILIES[architecture][1])(config)
    shapes = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    if architecture != "NVEmbedModel":
        return shapes
    head = head or LatentHead()
    return [(NVEMBED_TRUNK + n, s) for n, s in shapes] + [
        (NVEMBED_HEAD + n, s) for n, s in head.shapes(config.hidden_size).items()
    ]


def build_checkpoint(
    dest: Path,
    tokenizer_dir: Path,
    architecture: str,
    *,
    vocab: int | None = None,
    dtype: str = "f32",
    seed: int = 0,
    legacy_rope_layout: bool = False,
    head: LatentHead | None = None,
    drop: Sequence[str] = (),
    **shape: object,
) -> Path:
    """A random checkpoint of ARCHITECTURE in DEST with TOKENIZER_DIR's tokenizer; returns DEST.

    SHAPE goes to `hf_config` (layers, hidden, heads, kv_heads, ffn, rope_theta, rope_scaling, any config key);
    VOCAB defaults to the tokenizer's size. Norm weights are drawn from [0.5, 1.5] and biases from N(0, 0.5), so a
    mis-mapped one shows; other weights from N(0, initializer_range). NVEmbedModel gets HEAD's latent-attention
    head with the published nested config. LEGACY_ROPE_LAYOUT writes transformers 4's `rope_theta` + `rope_scaling`
    (the published checkpoints) instead of `rope_parameters`. DROP names tensors to leave out (an incomplete
    checkpoint).
    """
    import torch
    from safetensors.torch import save_file

    from tests.reference import copy_tokenizer, hf_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    config = hf_config(architecture, vocab=vocab or len(hf_tokenizer(tokenizer_dir)), **shape)
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tensors = [(n, s) for n, s in tensor_shapes(architecture, config, head) if n not in drop]
    shards = _plan_shards(tensors, torch_dtype.itemsize)
    generator = torch.Generator().manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.perf_counter()
        values = {name: _random(name, s, torch_dtype, config.initializer_range, generator) for name, s in shard}
        save_file(values, dest / file, metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in values.values())
        total += nbytes
        weight_map.update(dict.fromkeys(values, file))
        del values
        if len(shards) > 1:  # a big checkpoint takes minutes: say where it is (stderr: benches print tables on stdout)
            print(f"  {file}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_config(dest, architecture, config, str(torch_dtype).removeprefix("torch."), legacy_rope_layout, head)
    copy_tokenizer(tokenizer_dir, dest)
    return dest


def llama3_checkpoint(dest: Path, layers: int, dtype: str = "bf16", **shape: int) -> Path:
    """A random LlamaBidirectionalModel checkpoint of a Llama-3 shape (`llama3_shape(**SHAPE)`, LAYERS deep) with
    the Llama-3 tokenizer: what llama-embed-nemotron-8b's conversion reads, at any depth."""
    from tests.hf_tokenizers import llama3_tokenizer_dir

    with tempfile.TemporaryDirectory() as tmp:
        tok = llama3_tokenizer_dir(Path(tmp))
        options = dict(layers=layers, dtype=dtype, legacy_rope_layout=True, **llama3_shape(**shape))
        return build_checkpoint(dest, tok, "LlamaBidirectionalModel", **options)


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors in order, in shards of at most SHARD_BYTES (a bigger single tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _random(name: str, shape: tuple[int, ...], dtype, std: float, generator) -> torch.Tensor:
    import torch

    t = torch.empty(shape, dtype=dtype)
    if name.startswith(NVEMBED_HEAD):  # the published head's scales: unit-variance logits, so mistakes show
        if name.endswith("latents"):
            return t.normal_(0.0, 1.0, generator=generator)
        if name.endswith("bias"):
            return t.normal_(0.0, 0.1, generator=generator)
        if "norm" in name:
            return t.uniform_(0.5, 1.5, generator=generator)
        return t.normal_(0.0, shape[-1] ** -0.5, generator=generator)
    if "norm" in name:
        return t.uniform_(0.5, 1.5, generator=generator)
    if name.endswith(".bias"):
        return t.normal_(0.0, 0.5, generator=generator)
    return t.normal_(0.0, std, generator=generator)


def _write_config(dest: Path, architecture: str, config, dtype: str, legacy_rope_layout: bool, head) -> None:
    """config.json as `save_pretrained` writes it (NVEmbedModel: the published nested layout)."""
    config.architectures = [architecture]
    config.dtype = dtype
    if architecture == "NVEmbedModel":
        head = head or LatentHead()
        text = config.to_dict()
        text.update(architectures=["MistralModel"], model_type="bidir_mistral")
        values = {
            "architectures": ["NVEmbedModel"],
            "model_type": "nvembed",
            "hidden_size": config.hidden_size,
            "text_config": text,
            "latent_attention_config": {
                "model_type": "latent_attention",
                "num_latents_value": head.latents,
                "num_cross_heads": head.cross_heads,
                "cross_dim_head": head.cross_dim_head,
                "hidden_dim": config.hidden_size,
                "latent_dim": config.hidden_size,
                "output_normalize": True,
            },
            "padding_side": "right",
            "add_pad_token": True,
            "add_eos": True,
            "is_mask_instruction": True,
            "mask_type": "b",
        }
    else:
        values = json.loads(config.to_json_string())
    if legacy_rope_layout:
        params = values.pop("rope_parameters")
        values["rope_theta"] = params.pop("rope_theta")
        values["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    (dest / "config.json").write_text(json.dumps(values, indent=2) + "\n")


# --- GGUFs from a converted one ----------------------------------------------------------------------------
# Byte offsets of the f16 scale fields in each block (ggml-common.h's block_q4_0 ... block_q6_K): random
# bytes elsewhere are valid quants; scales are pinned small so activations stay finite through 32 layers.
SCALE_OFFSETS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
SCALE = 2.0**-10
_STRING, _U32 = 8, 4  # GGUF value types (gguf-py's GGUFValueType)


@dataclass(frozen=True)
class _Source:
    """A GGUF's metadata entries as raw bytes and its tensors' places: enough to copy it with a few entries or
    tensors changed (read by quantize/gguf_header.py, so the vocabulary is never decoded)."""

    path: Path
    entries: dict[str, bytes]  # key -> the whole entry (key, type, value) as in the file
    values: dict[str, object]  # scalars and strings
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (numpy shape, ggml type, absolute offset)

    @classmethod
    def read(cls, path: Path) -> _Source:
        from quantize.gguf_header import read_header

        header = read_header(path)
        with open(path, "rb") as f:
            head = f.read(max((end for _, end in header.entry_spans.values()), default=0))
        entries = {key: head[start:end] for key, (start, end) in header.entry_spans.items()}
        tensors = {
            name: (shape, int(qtype), header.data_offset + offset)
            for (name, shape, qtype), offset in zip(header.tensors, header.tensor_offsets, strict=True)
        }
        return cls(Path(path), entries, header.metadata, tensors)

    def data(self, name: str) -> np.ndarray:
        import gguf
        import numpy as np

        from quantize.sizes import nbytes

        shape, qtype, offset = self.tensors[name]
        n = nbytes(gguf.GGMLQuantizationType(qtype), shape)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(n,))


def write_gguf(dest: Path, entries: Sequence[bytes], tensors: Sequence[Tensor]) -> Path:
    """A GGUF v3 file of ENTRIES (raw metadata entries) and TENSORS (name, numpy shape, ggml type, uint8 data),
    written atomically. Data is aligned to 32 bytes (general.alignment unset)."""
    import gguf

    from quantize.files import atomic_path
    from quantize.sizes import nbytes

    align = 32
    info = b""
    offset = 0
    for name, shape, qtype, data in tensors:
        if data.nbytes != nbytes(gguf.GGMLQuantizationType(qtype), shape):
            raise ValueError(f"{name}: {data.nbytes} bytes of data for a {shape} tensor of type {qtype}")
        info += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        info += struct.pack("<IQ", qtype, offset)
        offset += -(-data.nbytes // align) * align
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(entries)) + b"".join(entries) + info
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        f.write(head + bytes(-len(head) % align))
        for *_, data in tensors:
            f.write(memoryview(data))
            f.write(bytes(-data.nbytes % align))
    return dest


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def u32_entry(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<II", _U32, value)


def str_entry(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", _STRING) + _string(value)


def synthesize(source: Path, layers: int, quant: str, dest: Path) -> Path:
    """SOURCE (a one-layer F16 GGUF) stretched to LAYERS copies of its layer, as QUANT, written to DEST.

    Metadata is copied with block_count and file_type changed; F16/F32 tensors keep the source's data (layer 0's
    for every layer); quantized tensors are random blocks of their type.
    """
    import gguf
    import numpy as np

    from quantize.sizes import TensorSpec, nbytes, tensor_types

    src = _Source.read(source)
    arch = str(src.values["general.architecture"])
    heads, kv_heads = (int(src.values[f"{arch}.attention.{k}"]) for k in ("head_count", "head_count_kv"))

    def origin(name: str) -> str:
        parts = name.split(".")
        return ".".join(["blk", "0", *parts[2:]]) if parts[0] == "blk" else name

    names = [n for n in src.tensors if not n.startswith("blk.")]
    names += [f"blk.{i}.{n.split('.', 2)[2]}" for i in range(layers) for n in src.tensors if n.startswith("blk.0.")]
    Q = gguf.GGMLQuantizationType
    specs = [TensorSpec(n, src.tensors[origin(n)][0], Q(src.tensors[origin(n)][1])) for n in names]
    types = tensor_types(specs, quant, layers, heads // kv_heads)

    rng = np.random.default_rng(0)
    pools: dict = {}
    for spec in specs:  # one random buffer per quantized type, as big as its largest tensor; tensors are slices
        qtype = types[spec.name]
        if qtype.name in SCALE_OFFSETS:
            need = nbytes(qtype, spec.shape)
            if qtype not in pools or pools[qtype].size < need:
                pools[qtype] = _random_blocks(qtype, need, rng)
    plan = []
    for spec in sorted(specs, key=lambda s: _natural_key(s.name)):
        qtype = types[spec.name]
        if qtype.name in SCALE_OFFSETS:
            data = pools[qtype][: nbytes(qtype, spec.shape)]
        elif qtype == spec.type:
            data = src.data(origin(spec.name))
        else:
            raise ValueError(f"{spec.name}: no data for {qtype.name} from a {spec.type.name} source")
        plan.append((spec.name, spec.shape, int(qtype), data))
    ftype = gguf.LlamaFileType.MOSTLY_F16 if quant == "F16" else gguf.LlamaFileType[f"MOSTLY_{quant}"]
    changed = {
        f"{arch}.block_count": u32_entry(f"{arch}.block_count", layers),
        "general.file_type": u32_entry("general.file_type", int(ftype)),
        "general.name": str_entry("general.name", dest.stem.removesuffix(f"-{quant}")),  # not the template's
    }
    entries = [changed.pop(k, v) for k, v in src.entries.items()] + list(changed.values())
    return write_gguf(dest, entries, plan)


def cut_layers(source: Path, layers: int, dest: Path) -> Path:
    """SOURCE with only its first LAYERS layers (real weights kept byte for byte), written to DEST."""
    src = _Source.read(source)
    key = f"{src.values['general.architecture']}.block_count"
    entries = [u32_entry(key, layers) if k == key else v for k, v in src.entries.items()]
    kept = [n for n in src.tensors if not n.startswith("blk.") or int(n.split(".")[1]) < layers]
    return write_gguf(dest, entries, [(n, src.tensors[n][0], src.tensors[n][1], src.data(n)) for n in kept])


def _random_blocks(qtype, nbytes: int, rng) -> np.ndarray:
    import gguf
    import numpy as np

    size = gguf.GGML_QUANT_SIZES[qtype][1]
    data = rng.integers(0, 256, nbytes, dtype=np.uint8)
    blocks = data.reshape(-1, size)
    scale = np.frombuffer(np.float16(SCALE).tobytes(), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype.name]:
        blocks[:, offset : offset + 2] = scale
    return data


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def template(workdir: Path) -> Path:
    """A one-layer F16 GGUF of the Llama-3.1-8B shape, converted by quantize/convert.py from a random bf16
    checkpoint (so the metadata and the Llama-3 vocabulary are what `runner convert` writes)."""
    from quantize.convert import convert

    out = workdir / "template"
    done = sorted(out.glob("*-F16.gguf"))
    if done:
        return done[0]
    ckpt = llama3_checkpoint(workdir / "llama-8b-shape-1l", 1)
    path = Path(convert(str(ckpt), out, "f16"))
    shutil.rmtree(ckpt)  # 1.5 GB, maybe of tmpfs
    return path


def model_files(workdir: Path, layers: int, quants: Sequence[str]) -> dict[str, Path]:
    """{quant: `<dir>/llama-8b-shape-<L>l-<QUANT>.gguf`}, random GGUFs of the Llama-3.1-8B shape, LAYERS deep, each
    synthesized once from the template: 32 layers in seconds, where a 16 GB conversion and llama.cpp's quantizer
    take minutes. The vectors mean nothing; the memory and the speed are those of the real shape."""
    directory = workdir / f"llama-8b-shape-{layers}l"
    files = {q: directory / f"llama-8b-shape-{layers}l-{q}.gguf" for q in quants}
    missing = [q for q, p in files.items() if not p.is_file()]
    if missing:
        source = template(workdir)
        for q in missing:
            t0 = time.perf_counter()
            synthesize(source, layers, q, files[q])
            size = files[q].stat().st_size / GIB
            print(f"wrote {files[q].name}: {size:.2f} GiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return files
