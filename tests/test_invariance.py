"""A text's vector does not depend on what else it is embedded with: on the CPU the engine decodes each text in its
own micro-batch, so alone, in a batch of 3 or in one of 60 it is the same bits, at every quant. Packed micro-batches
(Engine(packed=True), the fast path) give that up: llama.cpp's CPU flash attention tiles the keys from the start of
the micro-batch, and a quantized matmul turns the last-bit difference into ~1e-4."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from quantize.imatrix import calibration_texts
from quantize.ladder import quantize
from runner.engine import Engine
from runner.pipeline import Pipeline
from runner.retention import probe_path
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """MiniLM (BERT graph, no KV cache; its K-quants fall back to Q8_0/Q5_0) and the tiny nemotron (llama-embed
    graph, 256 wide: real K-quants, llama.cpp's tiled and repacked kernels)."""
    out = tmp_path_factory.mktemp("invariance")
    minilm = Path(run_cli("convert", "all-minilm-l6-v2").stdout.strip())
    nemotron = tiny("nemotron").gguf("f16")
    made = {("minilm", "F16"): minilm, ("nemotron", "F16"): nemotron}
    made |= dict(zip([("minilm", "Q8_0")], quantize(minilm, ["Q8_0"], out), strict=True))
    made |= dict(zip([("nemotron", "Q6_K"), ("nemotron", "Q4_K_M")], quantize(nemotron, ["Q6_K", "Q4_K_M"], out),
                     strict=True))  # fmt: skip
    return made


@pytest.mark.parametrize(
    "model,quant", [("minilm", "F16"), ("minilm", "Q8_0"), ("nemotron", "F16"), ("nemotron", "Q6_K"),
                    ("nemotron", "Q4_K_M")],
)  # fmt: skip
def test_a_vector_is_the_same_alone_and_in_any_batch(files, model: str, quant: str) -> None:
    # The probe's first 60 texts: queries of 5 tokens, code, prose in many scripts, passages of 300+ tokens.
    texts = [t.text for t in calibration_texts(probe_path())[:60]]
    with Engine(files[model, quant], n_threads=2) as engine:
        seqs = Pipeline(engine).tokenize(texts).seqs
        assert min(map(len, seqs)) < 8 and max(map(len, seqs)) > 128  # both sides of llama.cpp's kernel switches
        alone = np.stack([engine.embed_tokens([s])[0] for s in seqs])
        for size in (3, len(seqs)):
            batched = np.concatenate([engine.embed_tokens(seqs[i : i + size]) for i in range(0, len(seqs), size)])
            same = np.all(batched == alone, axis=1)
            assert same.all(), f"batches of {size}: {int((~same).sum())} of {len(seqs)} texts differ"
        engine.packed = True
        packed = engine.embed_tokens(seqs)
    # The fast path: the deviation the README documents, and what this test would have caught.
    cos = np.sum(packed * alone, axis=1) / (np.linalg.norm(packed, axis=1) * np.linalg.norm(alone, axis=1))
    assert cos.min() > 0.999 and not np.array_equal(packed, alone), cos.min()


def test_packing_is_asked_for(files, tmp_path) -> None:
    """The CPU default is one text per micro-batch; Embedder(packed=True) and `runner embed --packed` take the fast
    path (which GPU layers take by default: they need wide batches)."""
    from runner import Embedder

    path = files["minilm", "Q8_0"]
    with Embedder(str(path)) as default, Embedder(str(path), packed=True) as packed:
        assert default.pipeline.engine.packed is False and packed.pipeline.engine.packed is True
        texts = [t.text for t in calibration_texts(probe_path())[:12]]
        alone = np.stack([default.encode(t) for t in texts])
        assert np.array_equal(default.encode(texts), alone) and not np.array_equal(packed.encode(texts), alone)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    for flag in ("--packed", "--one-per-batch"):
        run_cli("embed", "-m", str(path), "--input", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.npy"), flag)
        got = np.load(tmp_path / "o.npy")
        assert np.array_equal(got, alone) == (flag == "--one-per-batch")


def test_the_server_gives_a_text_the_same_bits_under_16_concurrent_clients(files, tmp_path) -> None:
    """16 clients at once, each sending the same text among others of its own: the server batches requests
    together, and the text's vector is the bits it has alone, in every response (MiniLM Q8_0)."""
    from tests.test_server import AUTH, KEY, serving

    texts = [t.text for t in calibration_texts(probe_path())[:40]]
    common = texts[1]  # a 40-token passage

    def vectors(server, items: list[str]) -> np.ndarray:
        r = server.post("/v1/embeddings", {"input": items, "encoding_format": "base64"}, headers=AUTH)
        assert r.status_code == 200, r.text
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])

    with serving(tmp_path, "-m", str(files["minilm", "Q8_0"]), "--api-key", KEY) as server:
        alone = vectors(server, [common])[0]
        start = threading.Barrier(16)

        def client(i: int) -> np.ndarray:
            mine = texts[2 + 2 * i : 4 + 2 * i]
            start.wait()
            return vectors(server, [mine[0], *[common] * (i % 2), mine[1], common])

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(client, range(16)))
        batched = server.metric("embedrunner_batch_requests_sum") / server.metric("embedrunner_batch_requests_count")
    assert batched > 1, "no engine call served more than one request: nothing tested"
    for i, got in enumerate(answers):
        for row in [1, 3] if i % 2 else [2]:
            assert np.array_equal(got[row], alone), f"client {i}, row {row}"
