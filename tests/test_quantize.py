"""The quant ladder through llama.cpp's quantizer: files, manifest, and embeddings that still run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantize import llamacpp
from quantize.files import sha256
from quantize.quants import LADDER
from tests.conftest import DATA, embed_file, run_cli
from tests.reference import cosines


def _cpu_has_amx() -> bool:
    with open("/proc/cpuinfo") as f:
        return "amx_int8" in f.read()


@pytest.mark.skipif(not _cpu_has_amx(), reason="this CPU has no AMX: nothing to compile out")
def test_build_has_no_amx_kernels_on_amx_cpus() -> None:
    """scripts/install compiles AMX out where the CPU has it (ggml's AMX matmul crashed here)."""
    assert not llamacpp.has_amx_kernels(), "reinstall llama-cpp-python with scripts/install"


@pytest.fixture(scope="module")
def ladder(tiny):
    f16 = tiny("nemotron").gguf("f16")
    out = run_cli("quantize", str(f16), "--all")
    paths = [line for line in out.stdout.splitlines() if line.endswith(".gguf")]
    assert len(paths) == len(LADDER)
    assert out.stderr.count("\n") >= len(LADDER)  # a progress line per quant
    return f16


def test_ladder_files_and_manifest(ladder) -> None:
    manifest = json.loads((ladder.parent / "manifest.json").read_text())["files"]
    for quant in LADDER:
        path = ladder.parent / f"hf-{quant}.gguf"
        entry = manifest[path.name]
        assert entry["quant"] == quant and entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256(path)
        assert entry["source_revision"] == "local" and entry["converter_version"]
    assert not list(ladder.parent.glob(".*partial*"))


@pytest.mark.parametrize("quant,mean_bound", [("Q8_0", 0.999), ("Q6_K", 0.99), ("Q4_K_M", 0.95), ("Q2_K", 0.6)])
def test_quantized_models_embed(ladder, quant: str, mean_bound: float, tiny, tmp_path) -> None:
    """Runs in a subprocess: the AMX crash seen on these CPUs killed the process on quantized models."""
    got = embed_file(ladder.parent / f"hf-{quant}.gguf", DATA / "embedding_texts.jsonl", tmp_path / "q.npy")
    cos = cosines(got, tiny("nemotron").reference)
    assert np.isfinite(got).all() and cos.mean() >= mean_bound, cos.mean()


def test_file_sizes_predicted_from_shapes(ladder) -> None:
    """quantize/sizes.py reproduces llama.cpp's per-tensor type choice: every quant's bytes, exactly."""
    from planner.shapes import from_gguf
    from quantize.sizes import file_bytes, read_tensors

    shape = from_gguf(ladder)
    specs, header = read_tensors(ladder)
    for quant in ["F16", *LADDER]:
        path = ladder if quant == "F16" else ladder.parent / f"hf-{quant}.gguf"
        predicted = file_bytes(specs, quant, header, shape.layers, shape.n_gqa)
        assert predicted == path.stat().st_size, (quant, predicted, path.stat().st_size)
