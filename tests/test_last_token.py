"""Last-token embedders (the layouts of Qwen3-Embedding, gte-Qwen2-7B-instruct, e5-mistral-7b-instruct):
converted GGUFs match transformers float32 with last-token pooling, the bound catches a dropped EOS and a
flipped causal flag, Qwen2's tokenizer matches the published one, and every quant's size is predicted."""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from quantize.convert import convert
from quantize.manifest import read_metadata
from runner.engine import Engine
from runner.pipeline import Pipeline
from tests.conftest import DATA, embed_file, run_cli, texts
from tests.hf_tokenizers import LLAMA_CPP_VOCABS
from tests.last_token import LAST_TOKEN
from tests.reference import TOKENIZER_FILES, copy_tokenizer, cosines, hf_tokenizer

TEETH_TEXTS = 16  # enough to show a broken conversion, and each embeds 151k-wide logits in llama.cpp's qwen graphs


@pytest.mark.parametrize("name", list(LAST_TOKEN))
def test_f16_matches_reference(name: str, tiny_last, tmp_path) -> None:
    model = tiny_last(name)
    gguf = model.gguf("f16")
    meta = read_metadata(gguf)
    arch = meta["general.architecture"]
    assert meta[f"{arch}.pooling_type"] == 3 and meta[f"{arch}.attention.causal"] is LAST_TOKEN[name][2]
    assert meta["tokenizer.ggml.add_eos_token"] is True
    got = embed_file(gguf, DATA / "embedding_texts.jsonl", tmp_path / "out.npy")
    cos = cosines(got, model.reference)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min(), np.argsort(cos)[:5])


def _embed(hf_dir: Path, outdir: Path, causal: bool) -> np.ndarray:
    """HF_DIR converted in this process (F32: no rounding in the way) and embedded, first TEETH_TEXTS texts."""
    gguf = convert(str(hf_dir), outdir, "f32", as_embedder=True, pooling="last", causal=causal)
    with Engine(gguf) as engine:
        return Pipeline(engine).embed(texts("embedding_texts.jsonl")[:TEETH_TEXTS])


def _fails_bound(got: np.ndarray, reference: np.ndarray) -> bool:
    cos = cosines(got, reference[: len(got)])
    return bool(cos.mean() < 0.9999 and cos.min() < 0.999)


def _linked_copy(src: Path, dest: Path) -> Path:
    """DEST holding links to SRC's files (the weights are not copied), tokenizer files left out."""
    dest.mkdir()
    for f in src.iterdir():
        if f.name not in TOKENIZER_FILES:
            (dest / f.name).symlink_to(f)
    return dest


def test_dropping_the_eos_fails_the_bound(tiny_last, tokenizer_dir, tmp_path, caplog) -> None:
    """The same Qwen3-Embedding weights with a tokenizer that appends no <|endoftext|>: the pooled token is
    the text's own last one (the upstream trap with self-converted GGUFs), and the conversion warns."""
    model = tiny_last("qwen3-embedding")
    hf = _linked_copy(model.hf_dir, tmp_path / "no-eos")
    copy_tokenizer(tokenizer_dir("qwen2"), hf)
    with caplog.at_level(logging.WARNING, logger="runner"):
        got = _embed(hf, tmp_path / "gguf", causal=True)
    assert "appends no EOS token" in caplog.text
    assert _fails_bound(got, model.reference)


@pytest.mark.parametrize("name", ["qwen3-embedding", "gte-qwen2"])
def test_flipping_the_attention_fails_the_bound(name: str, tiny_last, tmp_path) -> None:
    """Qwen3-Embedding run bidirectionally, gte-Qwen2 run causally (the upstream trap): caught."""
    model = tiny_last(name)
    assert _fails_bound(_embed(model.hf_dir, tmp_path, causal=not LAST_TOKEN[name][2]), model.reference)


def test_qwen2_tokenizer_matches_hf_and_llama_cpp_references(tiny_last) -> None:
    """llama.cpp on our GGUF: the published tokenizer.json's ids on the corpus (NFC applied by the runner:
    some lines are not NFC), and llama.cpp's reference tokenizations made by the real Qwen2 tokenizer."""
    model = tiny_last("gte-qwen2")
    hf = hf_tokenizer(model.hf_dir)
    corpus = texts("tokenizer_corpus.jsonl")
    assert any(unicodedata.normalize("NFC", t) != t for t in corpus)
    inputs = (LLAMA_CPP_VOCABS / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    inputs = inputs.split("\n__ggml_vocab_test__\n")[:-1]
    outputs = (LLAMA_CPP_VOCABS / "ggml-vocab-qwen2.gguf.out").read_text().splitlines()
    assert len(inputs) == len(outputs) > 20
    with Engine(model.gguf("f16")) as engine:
        pairs = [(t, hf(t)["input_ids"], engine.tokenize(t).tolist()) for t in corpus]
        mismatches = [p for p in pairs if p[1] != p[2]]
        assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[:3]}"
        eos = engine.eos
        for text, expected in zip(inputs, outputs, strict=True):
            assert engine.tokenize(text).tolist() == [int(t) for t in expected.split()] + [eos], repr(text)


def test_last_pooling_needs_the_attention_stated(tiny_last, tmp_path) -> None:
    """A bare checkpoint with last-token pooling (asked, or from its sentence-transformers files) must say
    causal or bidirectional; a registry model takes both from models.toml."""
    hf = tiny_last("gte-qwen2").hf_dir
    proc = run_cli("convert", str(hf), "--as-embedder", "--pooling", "last", "--outdir", str(tmp_path), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--pooling last needs --causal or --bidirectional" in proc.stderr
    st = _linked_copy(hf, tmp_path / "st")
    copy_tokenizer(hf, st)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    proc = run_cli("convert", str(st), "--as-embedder", "--outdir", str(tmp_path), check=False)
    assert proc.returncode == 1 and "sentence-transformers files" in proc.stderr, proc.stderr
    proc = run_cli("convert", "all-minilm-l6-v2", "--pooling", "cls", "--outdir", str(tmp_path), check=False)
    assert proc.returncode == 1 and "takes its pooling and attention from its entry" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("name", ["qwen3-embedding", "gte-qwen2"])
def test_sizes_predicted_to_the_byte(name: str, tiny_last) -> None:
    """The family's tensor layout (biases, q/k norms, head_dim != hidden/heads, no LM head) is the F16 file's,
    and quantize/sizes.py gives every quant's bytes exactly; the header within 1 % from config.json alone."""
    from planner.shapes import from_config
    from quantize.ladder import quantize
    from quantize.sizes import file_bytes, read_tensors

    model = tiny_last(name)
    f16 = model.gguf("f16")
    derived = from_config(name, json.loads((model.hf_dir / "config.json").read_text()))
    specs, header = read_tensors(f16)
    assert sorted(derived.tensors, key=str) == sorted(specs, key=str)
    assert abs(derived.header_bytes - header) <= 0.01 * f16.stat().st_size
    quants = ["Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"]
    for quant, path in zip(["F16", *quants], [f16, *quantize(f16, quants)], strict=True):
        predicted = file_bytes(specs, quant, header, derived.layers, derived.n_gqa)
        assert predicted == path.stat().st_size, (quant, predicted, path.stat().st_size)


REGISTRY_ROWS = {
    # name -> (GGUF arch, layers, hidden, KV heads, head dim, context the GGUF records)
    "qwen3-embedding-8b": ("qwen3", 36, 4096, 8, 128, 40960),
    "gte-qwen2-7b-instruct": ("qwen2", 28, 3584, 4, 128, 131072),
    "e5-mistral-7b-instruct": ("llama-embed", 32, 4096, 8, 128, 4096),  # its 4096-token sliding window
    "sfr-embedding-mistral": ("llama-embed", 32, 4096, 8, 128, 4096),
    "linq-embed-mistral": ("llama-embed", 32, 4096, 8, 128, 4096),
}


@pytest.mark.parametrize("name", list(REGISTRY_ROWS))
def test_registry_rows_plan_before_any_download(name: str) -> None:
    """Each row's shapes come from models.toml through its family; the planner sizes every quant offline."""
    from planner.hardware import Hardware
    from planner.policy import plan
    from planner.shapes import resolve_shape
    from quantize.registry import load_registry

    entry = load_registry()[name]
    assert entry.pooling == "last" and entry.causal is (name != "gte-qwen2-7b-instruct")
    shape = resolve_shape(name)
    want = REGISTRY_ROWS[name]
    assert (shape.arch, shape.layers, shape.hidden, shape.kv_heads, shape.head_dim, shape.context) == want
    assert entry.dims == shape.hidden
    gib = 2**30
    p = plan(shape, Hardware((), 64 * gib, 64 * gib, 8, True, "test"), 4096)
    assert p.chosen.quant == "F16" and p.device == "cpu"
    assert [r.needs.file for r in p.rows] == sorted((r.needs.file for r in p.rows), reverse=True)


def test_registry_entry_reaches_the_gguf_and_the_query_prompt(tiny_last, tmp_path, monkeypatch) -> None:
    """Converted under the qwen3-embedding-8b entry (the tiny weights stand in for the hub's), the GGUF records
    causal attention, last pooling, the card's query format (`Query:` with no space) and its Matryoshka
    dimensions; queries embed like the reference given that exact text, and cut to 128 dimensions like the
    reference's first 128, re-normalised."""
    from dataclasses import replace

    import quantize.convert
    from quantize.registry import load_registry
    from quantize.source import Source
    from runner.model import resolve_model
    from tests.last_token import reference_last_token

    real = load_registry()["qwen3-embedding-8b"]
    assert real.matryoshka_dims[0] == 32 and real.matryoshka_dims[-1] == real.dims == 4096
    entry = replace(real, dims=256, matryoshka_dims=[32, 128, 256])  # the tiny model is 256 wide
    model = tiny_last("qwen3-embedding")
    monkeypatch.setattr(quantize.convert, "resolve", lambda *a, **k: Source(model.hf_dir, entry.repo, "test", entry))
    gguf = convert("qwen3-embedding-8b", tmp_path, "f16")
    meta = read_metadata(gguf)
    assert meta["qwen3.attention.causal"] is True and meta["qwen3.pooling_type"] == 3
    assert meta["embedrunner.prompt.query"] == "Instruct: {task}\nQuery:{text}"
    assert meta["embedrunner.matryoshka.dims"] == "32,128,256"
    text = "how do llamas sleep?"
    expected = reference_last_token(model.hf_dir, [f"Instruct: {entry.default_task}\nQuery:{text}"], causal=True)
    with Engine(gguf) as engine:
        pipeline = Pipeline(engine, resolve_model(str(gguf)))
        assert cosines(pipeline.embed([text], query=True), expected)[0] >= 0.9999
        cut = pipeline.embed([text], query=True, dimensions=128)
    assert cut.shape == (1, 128) and abs(np.linalg.norm(cut) - 1) < 1e-5
    assert cosines(cut, expected[:, :128])[0] >= 0.9999


@pytest.mark.parametrize("max_length", [512, 2048])
def test_buffers_match_llama_cpp(tiny_last, max_length: int) -> None:
    """KV cache exactly and the compute buffer, on a stock engine logits of every token included (its qwen graphs
    apply the LM head even in embedding mode), within 3 % of what llama.cpp reports."""
    from planner.memory import Settings, kv_per_layer, needs
    from planner.shapes import from_gguf
    from quantize import llamacpp

    path = tiny_last("qwen3-embedding").gguf("f16")
    shape, s = from_gguf(path), Settings(max_length, llamacpp.embeddings_only())
    with Engine(path) as engine:
        engine.reserve(max_length)
        got = llamacpp.buffer_sizes()
    mib = 2**20
    assert got["CPU KV"] == pytest.approx(kv_per_layer(shape, s) * shape.layers / mib, rel=0.01)
    assert got["CPU compute"] == pytest.approx(needs(shape, "F16", s).cpu.compute / mib, rel=0.03)
