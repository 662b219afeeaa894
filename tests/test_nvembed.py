"""NV-Embed-v2: a tiny random NVEmbedModel in the published layout, with the real Mistral tokenizer,
against tests/nvembed_reference.py (the published modeling code's math in float32 torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import DATA, embed_file, run_cli, texts
from tests.reference import cosines

TASK = "Given a question, retrieve passages that answer the question"
INSTRUCTION = f"Instruct: {TASK}\nQuery: "


@pytest.fixture(scope="module")
def nvembed(tmp_path_factory, tokenizer_dir):
    from tests.synth import build_checkpoint

    root = tmp_path_factory.mktemp("nvembed")
    hf = build_checkpoint(root / "hf", tokenizer_dir("mistral"), "NVEmbedModel")
    ggufs = {
        t: Path(run_cli("convert", str(hf), "--outdir", str(root / "gguf"), "--outtype", t).stdout.strip())
        for t in ("f32", "f16")
    }
    return hf, ggufs


@pytest.fixture(scope="module")
def references(nvembed):
    from tests.nvembed_reference import reference_nvembed

    hf, _ = nvembed
    items = texts("embedding_texts.jsonl")
    return {"document": reference_nvembed(hf, items), "query": reference_nvembed(hf, items, INSTRUCTION)}


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("kind", ["document", "query"])
def test_parity_batched(nvembed, references, outtype, kind, tmp_path):
    _, ggufs = nvembed
    flags = ["--query", "--task", TASK] if kind == "query" else ["--document"]
    ours = embed_file(ggufs[outtype], DATA / "embedding_texts.jsonl", tmp_path / "v.npy", *flags)
    cos = cosines(ours, references[kind])
    assert len(cos) >= 50
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min())


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_parity_alone(nvembed, references, outtype):
    """Each text in its own decode gives the reference vector too (no leakage across a batch)."""
    from runner import Embedder

    _, ggufs = nvembed
    items = texts("embedding_texts.jsonl")
    with Embedder(str(ggufs[outtype])) as model:
        docs = np.stack([model.encode_document(t) for t in items])
        queries = np.stack([model.encode_query(t, task=TASK) for t in items])
    for ours, kind in ((docs, "document"), (queries, "query")):
        cos = cosines(ours, references[kind])
        assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (kind, cos.mean(), cos.min())


def test_fast_head_matches_literal_head(nvembed):
    """The folded head (two hidden x hidden products) against to_q/to_kv/SDPA/to_out, float32."""
    from runner.latent_attention import LatentAttentionHead
    from tests.nvembed_reference import literal_head, load_weights

    hf, ggufs = nvembed
    config = json.loads((hf / "config.json").read_text())
    head = LatentAttentionHead(ggufs["f32"].parent / "hf.head.gguf", None, ggufs["f32"])
    states = torch.randn(1, 300, config["hidden_size"]) * 2
    want = literal_head(states, load_weights(hf), config["latent_attention_config"]["num_cross_heads"])[0].numpy()
    got = head.forward(states[0].numpy())
    rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() <= 1e-5, rel.max()


def test_instruction_length_counts_like_the_hf_tokenizer(nvembed):
    """The pool mask's skip is len(tokenizer.tokenize(instruction)); llama.cpp's count must agree."""
    from runner.engine import Engine
    from tests.reference import hf_tokenizer

    hf, ggufs = nvembed
    tok = hf_tokenizer(hf)
    tasks = [TASK, "Retrieve semantically similar text.", "  leading spaces", "Classify: 北京 ü 🙂", "x"]
    with Engine(ggufs["f16"]) as engine:
        for task in tasks:
            instruction = f"Instruct: {task}\nQuery: "
            assert len(engine.tokenize(instruction, special=False)) == len(tok.tokenize(instruction)), task


def test_quantized_trunk_shares_the_head(nvembed, references, tmp_path):
    _, ggufs = nvembed
    (q8,) = [Path(p) for p in run_cli("quantize", str(ggufs["f16"]), "--quant", "Q8_0").stdout.split()]
    ours = embed_file(q8, DATA / "embedding_texts.jsonl", tmp_path / "v.npy")
    assert cosines(ours, references["document"]).mean() >= 0.999


def test_missing_head_tensor_is_one_line_error(tmp_path, tokenizer_dir):
    from tests.synth import build_checkpoint

    drop = ("latent_attention_model.cross_attend_blocks.0.fn.to_kv.weight",)
    hf = build_checkpoint(tmp_path / "hf", tokenizer_dir("mistral"), "NVEmbedModel", layers=1, drop=drop)
    proc = run_cli("convert", str(hf), "--outdir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "latent_attention_model.cross_attend_blocks.0.fn.to_kv.weight" in proc.stderr
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_head_from_another_conversion_is_refused(nvembed, tmp_path, tokenizer_dir):
    from tests.synth import build_checkpoint

    _, ggufs = nvembed
    other = build_checkpoint(tmp_path / "hf", tokenizer_dir("mistral"), "NVEmbedModel", layers=1, seed=1)
    run_cli("convert", str(other), "--outdir", str(tmp_path / "other"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(ggufs["f16"], mixed)
    shutil.copy(tmp_path / "other" / "hf.head.gguf", mixed / "hf.head.gguf")
    proc = run_cli("embed", "-m", str(mixed / ggufs["f16"].name), "hello", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "does not belong" in proc.stderr
    (mixed / "hf.head.gguf").unlink()
    proc = run_cli("embed", "-m", str(mixed / ggufs["f16"].name), "hello", check=False)
    assert proc.returncode == 1 and "hf.head.gguf is missing" in proc.stderr


def test_query_without_task_on_a_bare_file_is_one_line_error(nvembed):
    """A bare converted NV-Embed file carries the query template but no default task (the registry's has one)."""
    _, ggufs = nvembed
    proc = run_cli("embed", "-m", str(ggufs["f16"]), "--query", "what is a tensor?", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "--task" in proc.stderr


def test_parity_bounds_catch_a_missing_eos_or_instruction_mask(nvembed, references):
    """Teeth: embedding queries without the appended EOS, or with the instruction inside the mean, fails."""
    from runner.engine import Engine

    _, ggufs = nvembed
    items = [INSTRUCTION + t for t in texts("embedding_texts.jsonl")]
    with Engine(ggufs["f32"]) as engine:
        with_eos = [np.append(engine.tokenize(t), engine.eos) for t in items]
        no_eos = engine.embed_tokens([engine.tokenize(t) for t in items], skips=[0] * len(items))
        no_skip = engine.embed_tokens(with_eos, skips=[0] * len(items))
    for wrong in (no_eos, no_skip):
        assert cosines(wrong, references["query"]).min() < 0.99


def test_quantize_elsewhere_carries_the_head(nvembed, tmp_path):
    _, ggufs = nvembed
    out = run_cli("quantize", str(ggufs["f16"]), "--quant", "Q4_K_M", "--outdir", str(tmp_path)).stdout.split()
    assert (tmp_path / "hf.head.gguf").is_file()
    run_cli("embed", "-m", out[0], "hello")
