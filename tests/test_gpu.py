"""GPU offload (skipped without a CUDA build and a GPU): all layers or one layer on the GPU, the vectors still
match transformers float32. VRAM against the plan is measured by scripts/gpu-check (tools/gpu_check/vram.py)."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from planner.hardware import probe
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
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    model = tiny("nemotron")
    with Engine(model.gguf("f16"), n_gpu_layers=layers) as engine:
        got = Pipeline(engine).embed(texts("embedding_texts.jsonl"))
    cos = cosines(got, model.reference)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min())
    assert np.isfinite(got).all()
