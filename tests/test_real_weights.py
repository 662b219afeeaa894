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


def test_smollm2_quant_sizes_predicted(smollm2, tmp_path) -> None:
    """Every quant's file size from shapes alone: exact from the F16 GGUF's shapes, within 1 % from config.json.

    SmolLM2 is 576 wide, so K-quant rows do not divide into 256-blocks: llama.cpp's fallbacks are exercised.
    """
    import json

    from planner.shapes import from_config, from_gguf
    from quantize.quants import LADDER
    from quantize.sizes import file_bytes, read_tensors

    hf_dir, _ = smollm2
    f16 = run_cli("convert", str(hf_dir), "--outdir", str(tmp_path), "--as-embedder").stdout.strip()
    run_cli("quantize", f16, "--all")
    exact = from_gguf(tmp_path / "SmolLM2-135M-F16.gguf")
    derived = from_config("SmolLM2-135M", json.loads((hf_dir / "config.json").read_text()))
    specs, header = read_tensors(tmp_path / "SmolLM2-135M-F16.gguf")
    assert sorted(derived.tensors, key=str) == sorted(specs, key=str)
    for quant in ["F16", *LADDER]:
        real = (tmp_path / f"SmolLM2-135M-{quant}.gguf").stat().st_size
        assert file_bytes(specs, quant, header, exact.layers, exact.n_gqa) == real, quant
        guess = file_bytes(list(derived.tensors), quant, derived.header_bytes, derived.layers, derived.n_gqa)
        assert abs(guess - real) <= 0.01 * real, (quant, guess, real)
