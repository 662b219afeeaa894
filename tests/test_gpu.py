"""GPU offload (skipped without a CUDA build and a GPU): the same vectors on GPU as on CPU, VRAM as planned."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from runner.hardware import probe
from tests.conftest import texts
from tests.reference import cosines

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not llama_cpp.llama_supports_gpu_offload() or not probe().gpus, reason="needs CUDA llama.cpp and a GPU"
    ),
]


@pytest.mark.parametrize("layers", [99, 1])
def test_offloaded_matches_reference(tiny, layers) -> None:
    from runner.embed import embed_texts
    from runner.engine import Engine
    from runner.model import Prompts

    model = tiny("nemotron")
    with Engine(model.gguf("f16"), n_gpu_layers=layers) as engine:
        got = embed_texts(engine, texts("embedding_texts.jsonl"), Prompts("{text}", "{text}", None))
    cos = cosines(got, model.reference)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min())
    assert np.isfinite(got).all()
