"""Carry a checkpoint's tokenizer into GGUF so llama.cpp tokenizes exactly like the HF tokenizer.

Three families: byte-level BPE from tokenizer.json (GPT-2, Llama-3, SmolLM, Qwen2), SentencePiece from
tokenizer.model (Llama-2, Mistral), and WordPiece from tokenizer.json (BERT).
Special tokens and add-BOS/EOS come from gguf's SpecialVocab, which reads the post-processor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf

from quantize import gguf_keys
from quantize.errors import UnsupportedArchitecture

# The Llama-3 split pattern (also what transformers' tiktoken converter writes for Llama-3 ranks).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's (also Qwen2.5, Qwen3 and gte-Qwen2): Llama-3's with digits one at a time.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Normalizers llama.cpp's BPE lacks and the runner applies before tokenizing (gguf_keys.NORMALIZER).
NORMALIZERS = ("NFC",)


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int | None) -> str:
    """Write tokenizer metadata into WRITER; returns the tokenizer kind written ("gpt2", "llama" or "bert")."""
    tokenizer_json = _read_json(model_dir / "tokenizer.json")
    model = (tokenizer_json or {}).get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        _add_bpe(writer, tokenizer_json, vocab_size)
        kind = "gpt2"
    elif (model_dir / "tokenizer.model").is_file():
        _add_sentencepiece(writer, model_dir, vocab_size)
        kind = "llama"
    elif model.get("type") == "WordPiece":
        _add_wordpiece(writer, tokenizer_json, vocab_size)
        # llama.cpp's WordPiece drops Hangul/Indic vowel marks and lacks the long-word [UNK] rule:
        # 38 of our 466 corpus lines differed for all-MiniLM-L6-v2. Carry the HF tokenizer instead.
        writer.add_string(gguf.Keys.Tokenizer.HF_JSON, (model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        writer.add_string(gguf_keys.TOKENIZER, "huggingface")
        kind = "bert"
    else:
        raise UnsupportedArchitecture(
            f"{model_dir}: tokenizer not supported (need a byte-level BPE or WordPiece "
            "tokenizer.json, or a SentencePiece tokenizer.model)"
        )
    # SpecialVocab warns about pair-template separators and CLS handlers, which embedding never uses.
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=(kind == "gpt2"), n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)
    finally:
        gguf_log.setLevel(level)
    return kind


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """Name llama.cpp's pre-tokenizer matching the HF one (structure and split pattern, not a hash)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == LLAMA3_PATTERN and steps[0].get("behavior") == "Isolated":
            return "llama-bpe"
        if pattern == QWEN2_PATTERN and steps[0].get("behavior") == "Isolated":
            return "qwen2"
    raise UnsupportedArchitecture(
        f"tokenizer.json pre-tokenizer {types} is not one llama.cpp reproduces here "
        "(supported: GPT-2 byte-level, Llama-3 or Qwen2 split + byte-level, SmolLM digits + byte-level)"
    )


def _add_bpe(writer: gguf.GGUFWriter, tokenizer_json: dict, vocab_size: int | None) -> None:
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    if normalizer is not None and normalizer not in NORMALIZERS:
        raise UnsupportedArchitecture(f"byte-level BPE tokenizer with a {normalizer} normalizer is not supported")
    pieces: dict[int, tuple[str, int]] = {
        i: (tok, gguf.TokenType.NORMAL) for tok, i in tokenizer_json["model"]["vocab"].items()
    }
    for added in tokenizer_json.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        pieces[added["id"]] = (added["content"], kind)
    n = max(vocab_size or 0, max(pieces) + 1)
    tokens = [pieces.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(n)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer_json))
    writer.add_token_list([t for t, _ in tokens])
    writer.add_token_types([k for _, k in tokens])
    if normalizer is not None:
        # llama.cpp's BPE does not normalise (Qwen2's tokenizer.json has NFC): the runner does, before tokenizing.
        writer.add_string(gguf_keys.NORMALIZER, normalizer)


def _add_sentencepiece(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int | None) -> None:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    n = max(vocab_size or 0, sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [gguf.TokenType.UNUSED] * n
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    for key, added in config.get("added_tokens_decoder", {}).items():
        i = int(key)
        if i >= n or i < sp.vocab_size():
            continue
        tokens[i] = added["content"].encode("utf-8")
        scores[i] = -1000.0
        types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if (prefix := config.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(prefix)


def _add_wordpiece(writer: gguf.GGUFWriter, tokenizer_json: dict, vocab_size: int | None) -> None:
    normalizer = tokenizer_json.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer" and not normalizer.get("lowercase", True):
        raise UnsupportedArchitecture("cased WordPiece vocabularies are not supported (llama.cpp lowercases)")
    prefix = tokenizer_json["model"].get("continuing_subword_prefix", "##")
    pieces = {i: (tok, gguf.TokenType.NORMAL) for tok, i in tokenizer_json["model"]["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        pieces[added["id"]] = (
            added["content"],
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED,
        )
    n = max(vocab_size or 0, max(pieces) + 1)
    tokens, types = [], []
    for i in range(n):
        tok, kind = pieces.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        # llama.cpp's WordPiece marks word starts with U+2581 instead of marking continuations with "##".
        if kind == gguf.TokenType.NORMAL:
            tok = tok[len(prefix) :] if tok.startswith(prefix) else "\u2581" + tok
        tokens.append(tok)
        types.append(kind)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
