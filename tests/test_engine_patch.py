"""The engine patch (scripts/engine-patches/): it applies exactly once, the runner detects which engine it has,
and the planner counts what that engine allocates, held to llama.cpp's own buffer reports for every family."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from planner.hardware import Gpu, Hardware, with_overrides
from planner.memory import (
    Settings,
    compute_bytes,
    kv_per_layer,
    lm_head_compute_bytes,
    logits_bytes,
    needs,
    output_bytes,
)
from planner.policy import plan
from planner.shapes import resolve_shape
from quantize.quants import FIDELITY

GIB = 2**30
MIB = 2**20
ROOT = Path(__file__).resolve().parent.parent
APPLY = ROOT / "scripts" / "engine-patches" / "apply"
SDIST = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedrunner" / "sdist"
VERSION = "0.3.36"


def at_least(quant: str, floor: str) -> bool:
    return FIDELITY.index(quant) <= FIDELITY.index(floor)


def table_machine(vram: list[int], ram: int, embeddings_only: bool) -> Hardware:
    """A row of bench.what_runs_where: the GPUs and RAM it names, 1 GiB kept back on each."""
    gpus = tuple(Gpu(i, "table", v * GIB, v * GIB) for i, v in enumerate(vram))
    hw = Hardware(gpus, ram * GIB, ram * GIB, 8, True, "test", embeddings_only=embeddings_only)
    return with_overrides(hw, reserve=GIB)


# --- the patch itself ---------------------------------------------------------------------------------------


def test_patch_applies_exactly_once(tmp_path) -> None:
    """On llama-cpp-python's sdist the patch applies; a second time it is refused, naming the patch, and nothing
    changes (scripts/install stops there instead of building an engine it did not mean to)."""
    sdist = SDIST / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        pytest.skip(f"no {sdist}: scripts/install keeps llama-cpp-python's sdist there")
    top = f"llama_cpp_python-{VERSION}"
    members = [f"{top}/llama_cpp", f"{top}/vendor/llama.cpp/src", f"{top}/vendor/llama.cpp/include"]
    subprocess.run(["tar", "-xzf", str(sdist), "-C", str(tmp_path), *members], check=True)
    src = tmp_path / top
    header = src / "vendor/llama.cpp/include/llama.h"
    assert "embeddings_only" not in header.read_text()

    first = subprocess.run([str(APPLY), str(src)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stderr.strip() == "engine patch applied: embeddings-only.patch"
    assert "bool embeddings_only;" in header.read_text()
    assert '("embeddings_only", ctypes.c_bool)' in (src / "llama_cpp/llama_cpp.py").read_text()

    patched = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    again = subprocess.run([str(APPLY), str(src)], capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.startswith(f"engine patch embeddings-only.patch does not apply to {src}:")
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == patched


# --- the planner: what each engine allocates ----------------------------------------------------------------


def test_the_patched_engine_counts_no_logits() -> None:
    """Qwen3-Embedding-8B at 4096 tokens: the stock engine's logits (output buffer and LM head) are gone."""
    shape = resolve_shape("qwen3-embedding-8b")
    stock, patched = Settings(4096), Settings(4096, embeddings_only=True)
    logits = 4 * 4096 * shape.vocab  # 2.3 GiB for Qwen's 151,665 tokens
    assert logits_bytes(shape, stock) == logits and logits_bytes(shape, patched) == 0
    assert output_bytes(shape, stock) - output_bytes(shape, patched) == logits
    # The head runs after the layers: the stock compute buffer is the larger of the two phases, not their sum.
    assert (
        needs(shape, "Q4_K_M", stock).cpu.compute == lm_head_compute_bytes(shape, stock) > compute_bytes(shape, stock)
    )
    assert needs(shape, "Q4_K_M", patched).cpu.compute == compute_bytes(shape, patched)
    gpu = needs(shape, "Q4_K_M", patched, (shape.layers,))
    assert gpu.gpus[0].compute == compute_bytes(shape, patched) and gpu.cpu.output == 4 * 4096 * shape.hidden


# The README's "what runs where" claims for the engine scripts/install builds (bench.what_runs_where).
PATCHED_FLOORS = [
    ("qwen3-embedding-8b", [8], 16, "Q4_K_M", "gpu"),
    ("gte-qwen2-7b-instruct", [8], 16, "Q4_K_M", "gpu"),
    ("llama-embed-nemotron-8b", [], 8, "Q4_K_M", "cpu"),
    ("qwen3-embedding-8b", [], 8, "Q4_K_M", "cpu"),
    ("gte-qwen2-7b-instruct", [], 8, "Q4_K_M", "cpu"),
]


@pytest.mark.parametrize(("model", "vram", "ram", "floor", "where"), PATCHED_FLOORS)
def test_what_runs_where_on_the_patched_engine(model, vram, ram, floor, where) -> None:
    chosen = plan(resolve_shape(model), table_machine(vram, ram, embeddings_only=True), 4096).chosen
    assert chosen.fits == where and at_least(chosen.quant, floor), (chosen.quant, chosen.fits)


def test_a_stock_engine_is_planned_as_it_allocates() -> None:
    """The same machine and model on a stock engine: its logits push Qwen3-Embedding below Q4_K_M on an 8 GiB GPU."""
    shape = resolve_shape("qwen3-embedding-8b")
    stock = plan(shape, table_machine([8], 16, embeddings_only=False), 4096).chosen
    patched = plan(shape, table_machine([8], 16, embeddings_only=True), 4096).chosen
    assert stock.fits == "gpu" and not at_least(stock.quant, "Q4_K_M")
    assert FIDELITY.index(patched.quant) < FIDELITY.index(stock.quant)


def test_the_probe_reports_the_installed_engine() -> None:
    from planner import hardware
    from quantize import llamacpp

    hw = hardware.probe()
    assert hw.embeddings_only is llamacpp.embeddings_only()
    assert hw.as_json()["engine_embeddings_only"] is hw.embeddings_only


# --- the installed engine against the planner ---------------------------------------------------------------


@pytest.fixture(scope="module")
def family_gguf(tiny, tiny_last, tokenizer_dir, tmp_path_factory):
    """F16 GGUFs of the tiny nemotron, NV-Embed, Qwen3-Embedding and gte-Qwen2 models, made on first use."""
    from quantize.convert import convert
    from tests.synth import build_checkpoint

    def nv_embed() -> Path:
        root = tmp_path_factory.mktemp("engine-nvembed")
        hf_dir = build_checkpoint(root / "hf", tokenizer_dir("mistral"), "NVEmbedModel")
        return convert(str(hf_dir), root / "gguf", "f16")

    makers = {
        "nemotron": lambda: tiny("nemotron").gguf("f16"),
        "nv-embed": nv_embed,
        "qwen3-embedding": lambda: tiny_last("qwen3-embedding").gguf("f16"),
        "gte-qwen2": lambda: tiny_last("gte-qwen2").gguf("f16"),
    }
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = makers[name]()
        return made[name]

    return get


@pytest.mark.parametrize("max_length", [512, 4096])
@pytest.mark.parametrize("model", ["nemotron", "nv-embed", "qwen3-embedding", "gte-qwen2"])
def test_buffers_match_the_engine(family_gguf, model: str, max_length: int) -> None:
    """KV cache, compute buffer (with the qwen graphs' logits on a stock engine) and output buffer as llama.cpp
    reports them when the context is made, against the planner told which engine this is (within 3 %).

    At creation the output buffer holds n_seq outputs (it grows to a whole micro-batch at the first decode,
    which RSS shows: tests/test_plan.py::test_peak_rss_within_15_percent)."""
    from planner.shapes import from_gguf
    from quantize import llamacpp
    from runner.engine import Engine

    path = family_gguf(model)
    shape, s = from_gguf(path), Settings(max_length, llamacpp.embeddings_only())
    with Engine(path) as engine:
        engine.reserve(max_length)
        got = llamacpp.buffer_sizes()
    at_creation = 4 * s.n_seq * (shape.hidden + (0 if s.embeddings_only else shape.vocab))
    print(f"{model} {max_length}: llama.cpp {got}; planner compute {needs(shape, 'F16', s).cpu.compute / MIB:.2f}")
    assert got["CPU KV"] == pytest.approx(kv_per_layer(shape, s) * shape.layers / MIB, rel=0.01)
    assert got["CPU compute"] == pytest.approx(needs(shape, "F16", s).cpu.compute / MIB, rel=0.03)
    assert got["CPU output"] == pytest.approx(at_creation / MIB, rel=0.01)


def test_the_detected_engine_is_the_built_one(family_gguf) -> None:
    """What the runner detects (the binding's embeddings_only field) is what the library does: after a decode a
    patched engine holds no logits at all, a stock one holds them for every token."""
    import llama_cpp
    import numpy as np

    from quantize import llamacpp
    from runner.engine import Engine

    with Engine(family_gguf("qwen3-embedding")) as engine:
        vectors = engine.embed_tokens([engine.tokenize("how do llamas sleep?")])
        logits = llama_cpp.llama_get_logits(engine._ctx)
    assert np.isfinite(vectors).all() and np.linalg.norm(vectors) > 0
    assert bool(logits) is not llamacpp.embeddings_only()
