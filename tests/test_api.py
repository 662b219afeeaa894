"""The Python API gives the CLI's vectors, with sentence-transformers' conventions."""

from __future__ import annotations

import numpy as np

from runner import Embedder
from tests.conftest import DATA, embed_file, texts


def test_embedder_matches_cli(tmp_path) -> None:
    # F16 named on both sides: the shared test home's pin may be another quant, whose vectors depend slightly on
    # how the texts are batched (the CLI streams micro-batches, encode() takes one list).
    cli = embed_file("all-minilm-l6-v2", DATA / "embedding_texts.jsonl", tmp_path / "o.npy", "--quant", "F16")
    with Embedder("all-minilm-l6-v2", quant="F16") as model:
        api = model.encode(texts("embedding_texts.jsonl"))
        one = model.encode("hello")
        assert model.dims == 384 and one.shape == (384,)
        np.testing.assert_allclose(api, cli, atol=1e-6)
        np.testing.assert_allclose(model.encode_document(["hello"])[0], one, atol=1e-6)
        raw = model.encode(["hello"], normalize_embeddings=False)
        assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
