"""Embeddings from `runner embed` on converted GGUFs match transformers float32 (bidirectional, mean, L2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import DATA, TINY, embed_file, run_cli, texts
from tests.reference import cosines, reference_embed


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("name", list(TINY))
def test_random_weights_match_reference(name: str, outtype: str, tiny, tmp_path) -> None:
    model = tiny(name)
    got = embed_file(model.gguf(outtype), DATA / "embedding_texts.jsonl", tmp_path / "out.npy")
    cos = cosines(got, model.reference)
    assert len(cos) >= 50
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min(), np.argsort(cos)[:5])


def test_vectors_are_unit_length_unless_asked(tiny, tmp_path) -> None:
    gguf = tiny("nemotron").gguf("f32")
    unit = embed_file(gguf, DATA / "embedding_texts.jsonl", tmp_path / "a.npy")
    raw = embed_file(gguf, DATA / "embedding_texts.jsonl", tmp_path / "b.npy", "--no-normalize")
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    assert cosines(unit, raw).min() > 0.99999


def test_text_alone_equals_text_in_mixed_batch(tiny, tmp_path) -> None:
    gguf = tiny("mistral").gguf("f32")
    all_texts = texts("embedding_texts.jsonl")
    batch = embed_file(gguf, DATA / "embedding_texts.jsonl", tmp_path / "all.npy")
    for i in (0, 20, len(all_texts) - 1):
        (tmp_path / "one.jsonl").write_text(json.dumps(all_texts[i]) + "\n")
        alone = embed_file(gguf, tmp_path / "one.jsonl", tmp_path / "one.npy")
        assert cosines(alone, batch[i : i + 1])[0] >= 0.9999


def test_query_prompt_from_registry(tiny, tmp_path) -> None:
    """`--query` applies the registry's instruction template; `--document` embeds the bare text."""
    model = tiny("nemotron")
    home = tmp_path / "home"
    (home / "tiny-nemotron").mkdir(parents=True)
    (home / "tiny-nemotron" / "tiny-nemotron-F32.gguf").symlink_to(model.gguf("f32"))
    registry = tmp_path / "models.toml"
    registry.write_text(
        '[tiny-nemotron]\nrepo = "local/tiny"\narchitecture = "LlamaBidirectionalModel"\npooling = "mean"\n'
        'dims = 256\nmax_length = 512\nlicense = "test"\n'
        'query_prompt = "Instruct: {task}\\nQuery: {text}"\ndefault_task = "Find the answer"\n'
    )
    env = {"EMBEDRUNNER_HOME": str(home), "EMBEDRUNNER_MODELS": str(registry)}
    text = "what is a llama?"
    runs = {
        "default-task": (["--query"], f"Instruct: Find the answer\nQuery: {text}"),
        "own-task": (["--query", "--task", "Classify it"], f"Instruct: Classify it\nQuery: {text}"),
        "document": (["--document"], text),
    }
    for flags, expected in runs.values():
        out = tmp_path / "q.npy"
        run_cli("embed", "-m", "tiny-nemotron", text, "-o", str(out), *flags, env=env)
        ref = reference_embed(model.hf_dir, [expected])
        assert cosines(np.load(out), ref)[0] >= 0.9999, flags


def test_reference_check_has_teeth(tiny, tmp_path, monkeypatch) -> None:
    """Without the rope permutation of Q/K the same check fails: these bounds catch real conversion bugs."""
    from quantize.architectures.llama import Llama
    from quantize.convert import convert
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    model = tiny("nemotron")
    monkeypatch.setattr(Llama, "transform", lambda self, name, data: data)
    with Engine(convert(str(model.hf_dir), tmp_path, "f32")) as engine:
        got = Pipeline(engine).embed(texts("embedding_texts.jsonl"))
    cos = cosines(got, model.reference)
    assert cos.mean() < 0.9999 and cos.min() < 0.999, (cos.mean(), cos.min())
