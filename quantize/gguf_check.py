"""What a GGUF file must satisfy before anything acts on it: a file downloaded from strangers is hostile input.

llama.cpp's GGUF parser checks the container (sizes, offsets, alignment), but its model loader and graph
builders trust the hyper-parameters: an absurd block_count, a head count that does not divide the width,
an unknown rope scaling type or pooling type, a vocabulary that repeats a token or an SPM vocabulary
without its byte tokens end in a GGML_ASSERT or an uncaught C++ exception, and the whole process dies.
`check_gguf` reads the header with our own reader (quantize/gguf_header.py), checks the hyper-parameters
against the tensor inventory, and this project's keys (prompt templates, the pooling head's file name, the
max length), and raises a one-line CorruptModelFile naming the file and the key — before llama.cpp sees it.

Every path that hands a GGUF to llama.cpp or reads its prompts passes here: runner.model.resolve_model,
planner.shapes.from_gguf, runner.engine.Engine and quantize.ladder.quantize. Pure Python (the planner
imports it), and cached per file identity, so the several callers of one run read the header once.

>>> check_gguf(Path("all-minilm-l6-v2-F16.gguf")).metadata["general.architecture"]
'bert'
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import gguf

from quantize import gguf_keys
from quantize.errors import BadInput, CorruptModelFile, UnsupportedArchitecture
from quantize.gguf_header import TOKENS, Header, read_header

# The architectures whose llama.cpp loaders and graphs these checks were written against (llama.cpp 0.3.36:
# src/llama-model.cpp load_hparams, src/models/{llama,llama-embed,qwen2,qwen3,bert}.cpp).
ARCHITECTURES = ("llama-embed", "llama", "qwen2", "qwen3", "bert")
TOKENIZERS = ("llama", "gpt2", "bert")  # SPM, BPE, WordPiece
BYTE_TOKEN = 6  # tokenizer.ggml.token_type of a byte-fallback token (<0x0A>)
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: llama.cpp asserts block_count <= this
# Bounds on the sizes a model may declare (also held against config.json: quantize/architectures).
MAX_WIDTH = 1 << 20  # embedding_length
MAX_FFN = 1 << 24  # feed_forward_length
MAX_HEAD_DIM = 1 << 16  # attention key/value length
MAX_CONTEXT = 2**32 - 1  # context_length: a uint32
MAX_NAME = 64  # GGML_MAX_NAME, with its terminating zero
ROPE_SCALING = ("none", "linear", "yarn", "longrope")  # anything else is a GGML_ASSERT in load_hparams
POOLING_TYPES = (0, 1, 2, 3)  # none, mean, cls, last: other values abort when the graph is built
POOLINGS = ("mean", "cls", "last", "latent-attention")
# Weights llama.cpp can run on the CPU; integer, f64 and activation-only types are not model weights.
NOT_WEIGHTS = {
    gguf.GGMLQuantizationType[t] for t in ("Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64")
}  # fmt: skip
MAX_TEMPLATE = 4096  # characters in a prompt template or default task: NV-Embed's is under 100
MAX_LABEL = 1024  # characters in a name or licence note the runner prints
# Keys for mixture-of-experts and multi-token prediction: these embedders have neither, and non-zero values
# reach llama.cpp asserts (n_expert_used <= n_expert, n_layer_nextn <= n_layer, ...).
ZERO_KEYS = ("expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count")
ZERO_KEYS += ("nextn_predict_layers",)
SPECIAL_IDS = ("bos", "eos", "unknown", "seperator", "padding", "cls", "mask", "eot", "eom")
_PLACEHOLDER = re.compile(r"\{(task|text)\}")


def check_gguf(path: Path) -> Header:
    """PATH's header, checked; a CorruptModelFile (or UnsupportedArchitecture) naming the file and the key if not."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror or e})") from None
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    return _checked(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, str(path))


@functools.lru_cache(maxsize=16)
def _checked(resolved: str, size: int, mtime_ns: int, inode: int, shown: str) -> Header:
    """Keyed by the file's identity: a file replaced or rewritten since is read and checked again."""
    path = Path(shown)
    try:
        header = read_header(Path(resolved))
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # ValueError, struct.error: the reader's words for what is wrong
        raise CorruptModelFile(f"{path}: not a readable GGUF file ({e}); re-create it with `runner convert`") from None
    _Checker(path, header).run()
    return header


def check_template(template: object, where: str, key: str, *, task: bool) -> str:
    """A prompt template: `{text}` once, `{task}` at most once (only where TASK), no other braces, a sane length.

    Templates are filled by plain substitution (runner.model.Prompts), never str.format: a template is data
    from the file, and format specs (`{text:>300000000}`) or attribute lookups (`{text.__class__}`) are code.
    """
    if not isinstance(template, str):
        raise CorruptModelFile(f"{where}: {key} is not a string; re-convert the model")
    if len(template) > MAX_TEMPLATE:
        raise CorruptModelFile(f"{where}: {key} is {len(template)} characters long (at most {MAX_TEMPLATE})")
    found = _PLACEHOLDER.findall(template)
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise CorruptModelFile(f"{where}: {key} {template[:80]!r} has braces other than {{task}} and {{text}}")
    if found.count("text") != 1 or found.count("task") > (1 if task else 0):
        allowed = "{text} once and {task} at most once" if task else "{text} once and no {task}"
        raise CorruptModelFile(f"{where}: {key} {template[:80]!r} must hold {allowed}")
    return template


def plain_file_name(name: object, where: str, key: str) -> str:
    """A file name with no directory part: what the pooling head's name must be, so it stays beside the model."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\0" in name:
        raise CorruptModelFile(f"{where}: {key} {str(name)[:80]!r} is not a plain file name beside the model")
    return name


class _Checker:
    """One pass over a header; each method raises at the first problem it finds."""

    def __init__(self, path: Path, header: Header) -> None:
        self.path, self.h, self.meta = path, header, header.metadata
        self.arch = ""

    def fail(self, problem: str) -> CorruptModelFile:
        return CorruptModelFile(f"{self.path}: {problem}; not a model the runner can load safely (re-convert it)")

    def run(self) -> None:
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise self.fail("general.architecture is missing or not a string")
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"{self.path}: architecture {arch[:40]!r} is not one the runner checks and runs "
                f"({', '.join(ARCHITECTURES)})"
            )
        self.arch = arch
        self.tensors()
        self.hyperparameters()
        self.tokenizer()
        self.own_keys()

    # --- values -------------------------------------------------------------------------------
    def uint(self, key: str, lo: int, hi: int, default: int | None = None) -> int:
        if key in self.h.array_lengths:  # llama.cpp reads some keys per layer; these files never need that
            raise self.fail(f"{key} is an array; expected one integer")
        value = self.meta.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"{key} is missing or not an integer")
        if not lo <= value <= hi:
            raise self.fail(f"{key} = {value} is out of range ({lo} to {hi})")
        return value

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name)

    def expect(self, name: str, want: tuple[int, ...]) -> None:
        got = self.shapes.get(name)
        if got is not None and got != want:
            raise self.fail(f"tensor {name} has shape {got}, but the hyper-parameters say {want}")

    # --- the tensor inventory ----------------------------------------------------------------
    def tensors(self) -> None:
        h = self.h
        self.shapes: dict[str, tuple[int, ...]] = {}
        room = h.file_size - h.data_offset
        alignment = int(self.meta.get("general.alignment", 32))  # checked by the reader
        for (name, shape, qtype), offset in zip(h.tensors, h.tensor_offsets, strict=True):
            if not name or len(name.encode()) >= MAX_NAME:
                raise self.fail(f"tensor name {name[:80]!r} is empty or longer than {MAX_NAME - 1} bytes")
            if name in self.shapes:
                raise self.fail(f"tensor {name} appears twice")
            if qtype in NOT_WEIGHTS:
                raise self.fail(f"tensor {name} has type {qtype.name}, which is not a weight type")
            if len(shape) == 1 and qtype != gguf.GGMLQuantizationType.F32:
                raise self.fail(f"1-D tensor {name} is {qtype.name}; llama.cpp's files keep 1-D tensors F32")
            if min(shape) < 1 or math.prod(shape) >= 1 << 60:
                raise self.fail(f"tensor {name} has shape {shape}")
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise self.fail(f"tensor {name}: rows of {shape[-1]} are not whole {qtype.name} blocks of {block}")
            nbytes = math.prod(shape) // block * size
            if offset % alignment or offset + nbytes > room:
                raise self.fail(f"tensor {name}'s data (offset {offset}, {nbytes} bytes) is not inside the file")
            self.shapes[name] = shape

    # --- hyper-parameters against the tensors ------------------------------------------------
    def hyperparameters(self) -> None:
        key, uint = self.key, self.uint
        layers = uint(key("block_count"), 1, MAX_LAYERS)
        found = {int(n.split(".")[1]) for n in self.shapes if re.match(r"blk\.\d+\.", n)}
        if found != set(range(layers)):
            have = f"{len(found)} (blk.{min(found)} to blk.{max(found)})" if found else "none"
            raise self.fail(f"{key('block_count')} = {layers} but the file has tensors for {have} layers")
        embd = self.shape("token_embd.weight")
        if embd is None or len(embd) != 2:
            raise self.fail("no 2-D token_embd.weight tensor")
        self.vocab, width = embd
        hidden = uint(key("embedding_length"), 1, MAX_WIDTH)
        if hidden != width:
            raise self.fail(f"{key('embedding_length')} = {hidden} but token_embd.weight is {width} wide")
        if key("vocab_size") in self.meta:
            uint(key("vocab_size"), self.vocab, self.vocab)
        context = uint(key("context_length"), 1, MAX_CONTEXT)
        ffn = uint(key("feed_forward_length"), 1, MAX_FFN)
        heads = uint(key("attention.head_count"), 1, hidden)
        kv = uint(key("attention.head_count_kv"), 1, heads, default=heads)
        if heads % kv:
            raise self.fail(f"{key('attention.head_count')} = {heads} is not a multiple of head_count_kv = {kv}")
        if key("attention.key_length") not in self.meta and hidden % heads:
            raise self.fail(f"{key('embedding_length')} = {hidden} does not divide into {heads} heads")
        head_k = uint(key("attention.key_length"), 1, MAX_HEAD_DIM, default=hidden // heads)
        head_v = uint(key("attention.value_length"), 1, MAX_HEAD_DIM, default=hidden // heads)
        if head_k != head_v:  # every graph here asserts n_embd_head_k == n_embd_head_v
            raise self.fail(f"attention key_length {head_k} differs from value_length {head_v}")
        uint(key("rope.dimension_count"), head_k, head_k, default=head_k)  # llama/qwen graphs: n_rot == head dim
        scaling = self.meta.get(key("rope.scaling.type"), "linear")
        if scaling not in ROPE_SCALING:
            raise self.fail(f"{key('rope.scaling.type')} {str(scaling)[:40]!r} is not one of {', '.join(ROPE_SCALING)}")
        if key("pooling_type") in self.meta or key("pooling_type") in self.h.array_lengths:
            uint(key("pooling_type"), min(POOLING_TYPES), max(POOLING_TYPES))
        for name in ZERO_KEYS:
            if self.meta.get(key(name), 0) != 0 or key(name) in self.h.array_lengths:
                raise self.fail(f"{key(name)} is set; these embedders have no experts and no extra heads")
        for k, v in self.meta.items():
            if k.startswith(f"{self.arch}.") and isinstance(v, float) and not math.isfinite(v):
                raise self.fail(f"{k} = {v}")
        for i in range(layers):
            b = f"blk.{i}."
            self.expect(b + "attn_q.weight", (heads * head_k, hidden))
            self.expect(b + "attn_k.weight", (kv * head_k, hidden))
            self.expect(b + "attn_v.weight", (kv * head_v, hidden))
            self.expect(b + "attn_output.weight", (hidden, heads * head_v))
            self.expect(b + "ffn_up.weight", (ffn, hidden))
            self.expect(b + "ffn_gate.weight", (ffn, hidden))
            self.expect(b + "ffn_down.weight", (hidden, ffn))
        self.expect("position_embd.weight", (context, hidden))
        self.context = context

    # --- the vocabulary ----------------------------------------------------------------------
    def tokenizer(self) -> None:
        h, meta = self.h, self.meta
        model = meta.get("tokenizer.ggml.model")
        if model not in TOKENIZERS:
            raise self.fail(f"tokenizer.ggml.model {str(model)[:40]!r} is not one of {', '.join(TOKENIZERS)}")
        if h.array_types.get(TOKENS) != 8:
            raise self.fail(f"{TOKENS} is missing or not a list of strings")
        n = h.array_lengths[TOKENS]
        if n != self.vocab:
            raise self.fail(f"{TOKENS} holds {n} tokens but token_embd.weight has {self.vocab} rows")
        if h.distinct_tokens != n:
            raise self.fail(f"{TOKENS} repeats a token ({n - h.distinct_tokens} repeats)")
        if model == "llama" and h.byte_tokens != 256:
            raise self.fail(f"SPM vocabulary has {h.byte_tokens} of the 256 <0xXX> byte tokens")
        if model == "bert" and h.token_types.get(BYTE_TOKEN):  # llama.cpp aborts spelling one in WordPiece
            raise self.fail("WordPiece vocabulary has byte tokens (tokenizer.ggml.token_type 6)")
        for key, types in (("tokenizer.ggml.scores", (6, 5)), ("tokenizer.ggml.token_type", (5,))):
            if key in meta or (
                key in h.array_lengths and (h.array_types[key] not in types or h.array_lengths[key] != n)
            ):
                raise self.fail(f"{key} is not a list of {n} numbers")
        if model == "gpt2" and h.array_types.get("tokenizer.ggml.merges") != 8:
            raise self.fail("tokenizer.ggml.merges is missing or not a list of strings")
        for name in SPECIAL_IDS:
            key = f"tokenizer.ggml.{name}_token_id"
            if key in meta or key in h.array_lengths:
                self.uint(key, 0, n - 1)
        for flag, name in (("add_bos_token", "bos"), ("add_eos_token", "eos"), ("add_sep_token", "seperator")):
            value = meta.get(f"tokenizer.ggml.{flag}", False)
            if not isinstance(value, bool):
                raise self.fail(f"tokenizer.ggml.{flag} is not true or false")
            if value and f"tokenizer.ggml.{name}_token_id" not in meta:  # llama.cpp asserts when it adds one
                raise self.fail(f"tokenizer.ggml.{flag} is true but tokenizer.ggml.{name}_token_id is missing")
        kind = meta.get(gguf_keys.TOKENIZER)
        if kind is not None and (kind != "huggingface" or not isinstance(meta.get("tokenizer.huggingface.json"), str)):
            raise self.fail(f"{gguf_keys.TOKENIZER} {str(kind)[:40]!r}: only 'huggingface' with its tokenizer.json")

    # --- this project's keys -----------------------------------------------------------------
    def own_keys(self) -> None:
        meta, where = self.meta, str(self.path)
        for key in ("general.name", gguf_keys.LICENSE_NOTE):
            value = meta.get(key)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_LABEL or not value.isprintable()):
                raise self.fail(f"{key} is not a printable line of at most {MAX_LABEL} characters")
        if gguf_keys.QUERY_PROMPT in meta:
            check_template(meta[gguf_keys.QUERY_PROMPT], where, gguf_keys.QUERY_PROMPT, task=True)
        if gguf_keys.DOCUMENT_PROMPT in meta:
            check_template(meta[gguf_keys.DOCUMENT_PROMPT], where, gguf_keys.DOCUMENT_PROMPT, task=False)
        task = meta.get(gguf_keys.DEFAULT_TASK)
        if task is not None and (not isinstance(task, str) or len(task) > MAX_TEMPLATE):
            raise self.fail(f"{gguf_keys.DEFAULT_TASK} is not a string of at most {MAX_TEMPLATE} characters")
        if gguf_keys.MAX_LENGTH in meta:
            self.uint(gguf_keys.MAX_LENGTH, 1, self.context)
        pooling = meta.get(gguf_keys.POOLING)
        if pooling is not None and pooling not in POOLINGS:
            raise self.fail(f"{gguf_keys.POOLING} {str(pooling)[:40]!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "latent-attention" and gguf_keys.HEAD_FILE not in meta:
            raise self.fail(f"latent-attention pooling but no {gguf_keys.HEAD_FILE}")
        if gguf_keys.HEAD_FILE in meta or gguf_keys.HEAD_FILE in self.h.array_lengths:
            plain_file_name(meta.get(gguf_keys.HEAD_FILE), where, gguf_keys.HEAD_FILE)
            digest = meta.get(gguf_keys.HEAD_SHA256)
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise self.fail(f"{gguf_keys.HEAD_SHA256} is missing or not a sha256")
        for key in (gguf_keys.APPEND_EOS, gguf_keys.POOL_SKIP_INSTRUCTION):
            if key in meta and not isinstance(meta[key], bool):
                raise self.fail(f"{key} is not true or false")


__all__ = ["check_gguf", "check_template", "plain_file_name"]
