"""scripts/gpu-check on CPU: the pack, its offline install, the 8B-shaped file writer and the report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.synth import cut_layers, synthesize
from tools.gpu_check import PACK, pack, report

REPO = Path(__file__).resolve().parent.parent


def test_dry_run(tmp_path: Path) -> None:
    """`scripts/gpu-check dry-run`: every step of the GPU run that needs no CUDA. About 15 s with the pack current
    (it stays in .gpu-pack/ between runs); building it first needs PyPI and about 90 s more.

    What passing proves:
    - the pack is at most 60 MiB, and at most 64 MiB with the working tree that travels beside it;
    - every packed wheel installs offline for CPython 3.12 manylinux (unpacked with pip --target; not imported);
    - in a venv that sees only this machine's copies of the GPU machine's packages (torch, transformers,
      sentence-transformers, nvidia-ml-py and what pip says they pull in), the pack's requirements install
      with --no-index. The CPython-3.12-only wheels are replaced there by this interpreter's builds of the same
      versions, from the cache: Python 3.12 is not on this machine;
    - CMake configures the trimmed sdist (for the CPU: the CUDA configure is not run here), and the CPU wheel
      scripts/install built stands in for the CUDA build;
    - the project installs with --no-index --no-deps --no-build-isolation, and the GPU tests are collected in
      that venv (and skipped: no CUDA); the SmolLM2 cut loads in llama.cpp;
    - the report writer renders every section, from fabricated numbers.
    What it cannot prove: that the CUDA build compiles and links, and any measurement.
    """
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(REPO / "scripts" / "gpu-check"), "dry-run", "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["fabricated"] and [s["status"] for s in results["steps"]] == ["ok"] * len(results["steps"])
    assert "skipped" in results["pytest"] and "passed" not in results["pytest"], results["pytest"]
    manifest = json.loads((PACK / "manifest.json").read_text())
    assert manifest["bytes"] <= 60 * 2**20
    report = (out / "report.md").read_text()
    assert "FABRICATED" in report and "all steps passed" in report
    for section in ("## 1. VRAM", "## 2. Plans", "## 3. Speed", "## 4. Fallback", "latency"):
        assert section in report


@pytest.mark.parametrize(
    ("member", "kept"),
    [
        ("llama_cpp_python-0.3.36/pyproject.toml", True),
        ("llama_cpp_python-0.3.36/llama_cpp/llama_cpp.py", True),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu", True),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/src/llama-vocab.cpp", True),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf", False),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp", False),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/tools/mtmd/mtmd.cpp", False),
        ("llama_cpp_python-0.3.36/vendor/llama.cpp/docs/build.md", False),
        ("llama_cpp_python-0.3.36/tests/test_llama.py", False),
    ],
)
def test_sdist_trim(member: str, kept: bool) -> None:
    assert pack.keep_in_sdist(member) is kept


def test_synthesized_files_are_what_the_planner_predicts(tmp_path: Path, tiny) -> None:
    """The writer behind the GPU run's 8B-shaped files, on the tiny nemotron (its short rows exercise llama.cpp's
    per-tensor fallback types too): byte-exact the planner's file size, the right quant and depth, loadable and
    finite in llama.cpp. The cut of real weights keeps the first layers."""
    from planner.memory import Settings, needs
    from planner.shapes import file_quant, from_gguf
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    f16 = tiny("nemotron").gguf("f16")
    for quant in ("Q4_K_M", "Q8_0", "F16"):
        path = synthesize(f16, 3, quant, tmp_path / f"tiny-3l-{quant}.gguf")
        shape = from_gguf(path)
        assert (file_quant(path), shape.layers) == (quant, 3)
        assert path.stat().st_size == needs(shape, quant, Settings(512)).file
        with Engine(path) as engine:
            vectors = Pipeline(engine).embed(["A man is eating a piece of bread.", "A llama sleeps."])
        assert vectors.shape == (2, engine.n_embd) and np.isfinite(vectors).all()
    cut = cut_layers(tmp_path / "tiny-3l-F16.gguf", 1, tmp_path / "tiny-1l-F16.gguf")
    assert from_gguf(cut).layers == 1
    with Engine(cut) as engine:
        assert np.isfinite(Pipeline(engine).embed(["A llama sleeps."])).all()


def test_report_names_the_failed_step() -> None:
    results = dict(report.fabricated_results(), fabricated=False, started="now", deadline_s=540.0)
    results["steps"] = [
        dict(name="dependencies from the pack", budget_s=120, status="ok", seconds=8.0, note=""),
        dict(name="llama-cpp-python CUDA build", budget_s=360, status="failed", seconds=360.0, note="ran over 360 s"),
    ]
    text = report.render_report(results)
    assert "**FAILED at `llama-cpp-python CUDA build`**" in text and "ran over 360 s" in text
    assert "FABRICATED" not in text.splitlines()[0]
