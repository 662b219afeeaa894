"""Real trained weights: SmolLM2-135M converted by our converter matches transformers float32."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import DATA, embed_file, run_cli, texts
from tests.reference import cosines, reference_embed


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tests.real_models import smollm2_hf_dir

    hf_dir = smollm2_hf_dir(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M")
    return hf_dir, reference_embed(hf_dir, texts("embedding_texts.jsonl"))


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_smollm2_matches_reference(smollm2, outtype: str, tmp_path) -> None:
    hf_dir, ref = smollm2
    gguf = run_cli("convert", str(hf_dir), "--outdir", str(tmp_path), "--outtype", outtype, "--as-embedder")
    got = embed_file(gguf.stdout.strip(), DATA / "embedding_texts.jsonl", tmp_path / "out.npy")
    cos = cosines(got, ref)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min(), np.argsort(cos)[:5])
