"""A text's vector does not depend on what else it is embedded with: on the CPU the engine decodes each text in its
own micro-batch, so alone, in a batch of 3 or in one of 60 it is the same bits, at every quant. Packed micro-batches
(Engine(packed=True), the fast path) give that up: llama.cpp's CPU flash attention tiles the keys from the start of
the micro-batch, and a quantized matmul turns the last-bit difference into ~1e-4."""

from __future__ import annotations

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


def test_gpu_layers_pack_unless_asked_otherwise(files) -> None:
    """Packing is the default only where GPU layers need wide batches; the CPU default is one text per micro-batch."""
    with Engine(files["minilm", "F16"]) as cpu:
        assert cpu.packed is False
    with Engine(files["minilm", "F16"], packed=True) as asked:
        assert asked.packed is True
