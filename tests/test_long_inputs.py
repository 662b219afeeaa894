"""Inputs far longer than the max length are cut before they are tokenized, to exactly the tokens the whole
text gives (Pipeline.tokenize): proven on real vocabularies (WordPiece, Llama-3 BPE, SmolLM2 BPE,
SentencePiece) over texts built to put the cut where tokenizers are least local. And what is not text is
one line naming the input, through Embedder.encode and runner embed alike."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from quantize.errors import BadInput
from runner import pipeline as pipeline_module
from runner.engine import open_engine
from runner.pipeline import Pipeline
from tests.conftest import run_cli, texts

MINILM = "all-minilm-l6-v2"
CUT = 48  # tokens kept: small, so that every text below is many times longer


def long_texts() -> dict[str, str]:
    prose = " ".join(texts("embedding_texts.jsonl"))
    rng = np.random.default_rng(0)
    pool = list("abcdefghij  \n\t.,;:!?-'\"0123456789éüßçñ漢字かな한국어 🙂👍🏽")
    pool += ["e\u0301", "\u200b", "</s>", "[SEP]"]
    return {
        "prose": prose * 4,
        # WordPiece reads a word over 100 characters as one [UNK]: the prefixes grow past it to the prose.
        "giant-word-then-prose": "x" * 30_000 + " " + prose * 20,
        "words-around-100-chars": " ".join("w" * n for n in rng.integers(90, 110, 300)),
        "digits": "1234567890" * 3000 + " " + prose * 20,  # Llama-3 BPE groups digits by three from the left
        "space-runs": "".join("word" + " " * int(n) + "\n" * int(n % 3) for n in rng.integers(1, 40, 2000)),
        "cjk": "漢字かな交じり文の例。" * 3000,
        "emoji-combining": ("e\u0301" + "👍🏽" + "x ") * 5000,
        "special-token-strings": "</s><s>[SEP][CLS]<|endoftext|> a" * 2000,
        **{f"random-{seed}": "".join(np.random.default_rng(seed).choice(pool, 20_000)) for seed in range(3)},
    }


@pytest.fixture(scope="module")
def vocabularies(tiny) -> dict[str, Path]:
    """GGUFs with real tokenizers: MiniLM's WordPiece (the HF tokenizer), the tiny nemotron's Llama-3 BPE,
    the tiny Mistral's SentencePiece and SmolLM2's BPE (llama.cpp's tokenizers); each made when first used."""
    makers = {
        "wordpiece": lambda: Path(run_cli("convert", MINILM).stdout.strip()),
        "llama3-bpe": lambda: tiny("nemotron").gguf("f16"),
        "spm": lambda: tiny("mistral").gguf("f16"),
        "smollm2-bpe": lambda: tiny("llama-causal").gguf("f16"),
    }

    class Made(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = makers[name]()
            return self[name]

    return Made()


@pytest.mark.parametrize("vocab", ["wordpiece", "llama3-bpe", "spm", "smollm2-bpe"])
@pytest.mark.parametrize("chars_per_token, margin", [(8, 64), (1, 0), (3, 1)])
def test_head_of_a_long_text_tokenizes_as_the_whole(vocabularies, monkeypatch, vocab, chars_per_token, margin):
    """The first max_length tokens (and the closing special token) equal those of the whole text, also with
    prefixes that start near the cut and no margin, where only the check that two prefixes agree holds."""
    engine = open_engine(vocabularies[vocab])
    try:
        pipe = Pipeline(engine, max_length=CUT)
        longest: list[int] = []
        tokenize = engine.tokenize
        monkeypatch.setattr(engine, "tokenize", lambda text, *a: longest.append(len(text)) or tokenize(text, *a))
        for name, text in long_texts().items():
            monkeypatch.setattr(pipeline_module, "HEAD_CHARS_PER_TOKEN", chars_per_token)
            monkeypatch.setattr(pipeline_module, "HEAD_MARGIN", margin)
            longest.clear()
            head = pipe.tokenize([text])
            assert max(longest) < len(text), f"{name}: tokenized whole"
            monkeypatch.setattr(pipeline_module, "HEAD_CHARS_PER_TOKEN", 10**9)
            whole = pipe.tokenize([text])
            assert head.cut == whole.cut == [True], name
            assert head.seqs[0].tolist() == whole.seqs[0].tolist(), f"{vocab}, {name}"
    finally:
        engine.close()


def test_the_check_has_teeth(vocabularies) -> None:
    """The first prefix that gives more than max_length tokens is not enough: on these texts it differs from the
    whole text (a word over 100 characters is one [UNK] in WordPiece only when whole; BPE merges differ at
    the cut)."""
    differs = []
    for vocab in ("wordpiece", "llama3-bpe"):
        engine = open_engine(vocabularies[vocab])
        try:
            for name, text in long_texts().items():
                size = 1
                while len(prefix := engine.tokenize(text[:size])) <= CUT + 1:
                    size += 1
                if prefix[:CUT].tolist() != engine.tokenize(text)[:CUT].tolist():
                    differs.append((vocab, name))
        finally:
            engine.close()
    assert len(differs) >= 2, differs


def test_a_50mb_text_costs_little_memory(vocabularies, tmp_path) -> None:
    """A 50 MB text to Pipeline.embed: peak RSS grows by little more than the text (it took 7.3 GiB)."""
    script = textwrap.dedent(
        """
        import re, sys
        from runner.pipeline import open_pipeline

        def peak():
            return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024

        pipe = open_pipeline(sys.argv[1])
        text = "the quick brown fox jumps over the lazy dog " * (50 * 2**20 // 44)
        pipe.embed(["warm up"])
        before = peak()
        vectors = pipe.embed([text])
        print(peak() - before, vectors.shape)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(vocabularies["wordpiece"])], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown, shape = proc.stdout.split(" ", 1)
    assert shape.strip() == "(1, 384)"
    assert int(grown) < 200 * 2**20, f"peak RSS grew by {int(grown) / 2**20:.0f} MiB for a 50 MB text"


# --- what is not text --------------------------------------------------------------------------------------


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


NOT_TEXT = {
    # name: (input, the message's start)
    "lone-surrogate": ("fine \ud800 text", "input 1: not valid Unicode: a lone surrogate ('\\ud800') at character 5"),
    "5000-digit-integer": (int("7" * 4000), "input 1: int, not a text"),
    "nested-100000-deep": (nested(100_000), "input 1: list, not a text"),
    "none": (None, "input 1: NoneType, not a text"),
}


@pytest.mark.parametrize("case", NOT_TEXT)
def test_not_text_is_bad_input_naming_it(vocabularies, case) -> None:
    from runner import Embedder

    value, message = NOT_TEXT[case]
    model = Embedder(str(vocabularies["wordpiece"]))
    try:
        with pytest.raises(BadInput) as e:
            model.encode([value], show_progress_bar=False)
        assert str(e.value).startswith(message), e.value
    finally:
        model.close()


def test_token_ids_of_any_size_are_checked(vocabularies) -> None:
    engine = open_engine(vocabularies["wordpiece"])
    try:
        pipe = Pipeline(engine)
        for ids, says in [
            ([[101, 10**5000, 102]], "input 1: token id out of range"),
            ([[101, -(2**70), 102]], "input 1: token id out of range"),
            ([[101, True, 102]], "input 1: token ids must be a non-empty list of integers"),
            ([[101, [[102]]]], "input 1: token ids must be a non-empty list of integers"),
            ([[]], "input 1: token ids must be a non-empty list of integers"),
        ]:
            with pytest.raises(BadInput, match=f"^{says}"):
                pipe.from_token_ids(ids)
        assert pipe.from_token_ids([np.array([101, 102])]).seqs[0].tolist() == [101, 102]
    finally:
        engine.close()


def test_runner_embed_refuses_a_lone_surrogate_in_one_line(vocabularies, tmp_path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps("fine") + "\n" + '"bad \\ud800 one"\n', encoding="utf-8")
    proc = run_cli("embed", "-m", str(vocabularies["wordpiece"]), "--input", str(source), "-o",
                   str(tmp_path / "out.npy"), check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: input 2: not valid Unicode"), proc.stderr
