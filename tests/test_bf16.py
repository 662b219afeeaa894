"""BF16: the exact file of a model published in bfloat16, at F16's size. The planner takes it over F16 where this
CPU's calibration timed it faster (never on a GPU unless asked), `runner calibrate` times it, and a first run that
plans it converts to BF16 and makes every other quant from that file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from planner import plan_for
from planner.calibration import CALIBRATED_LAYERS, Calibration, cpu_identity, layer_shape, load, save
from planner.hardware import probe
from planner.policy import plan
from planner.shapes import from_gguf, resolve_shape
from quantize import gguf_keys
from quantize.manifest import read_metadata
from runner.calibrate import DEFAULT_QUANTS, default_quants
from tests.conftest import DATA, embed_file, run_cli, texts
from tests.reference import cosines, reference_embed
from tests.synth import LLAMA3_ROPE
from tests.test_calibrate import F16_FASTEST, MEASURED, cpu_machine

BF16_FASTEST = F16_FASTEST | {"BF16": 6.1}  # a CPU with BF16 units: BF16 ahead of F16 (4.7) and every quant
BF16_SLOWER = F16_FASTEST | {"BF16": 2.2}  # an AVX2 CPU: llama.cpp runs BF16 there too, converting as it goes


def nemotron(dtype: str | None):
    return replace(resolve_shape("llama-embed-nemotron-8b"), dtype=dtype)


@pytest.mark.parametrize("prefer", ["fidelity", "balanced", "speed"])
def test_bf16_is_taken_on_a_cpu_that_runs_it_faster(prefer) -> None:
    p = plan(nemotron("bfloat16"), cpu_machine(32), 4096, prefer=prefer, cpu_speeds=BF16_FASTEST, retention=MEASURED)
    assert (p.chosen.quant, p.device) == ("BF16", "cpu"), p.summary()
    assert p.chosen.retention == 1.0 and p.chosen.cpu_tokens_per_s == 6.1
    rows = {r["quant"]: r for r in p.as_json()["quants"]}
    assert rows["BF16"]["file_bytes"] == rows["F16"]["file_bytes"]  # the same bytes as F16


@pytest.mark.parametrize("prefer", ["fidelity", "balanced", "speed"])
def test_f16_stays_where_it_is_faster_or_bf16_is_untimed(prefer) -> None:
    shape = nemotron("bfloat16")
    for speeds in (BF16_SLOWER, F16_FASTEST, None):
        p = plan(shape, cpu_machine(32), 4096, prefer=prefer, cpu_speeds=speeds, retention=MEASURED)
        assert p.chosen.quant == "F16", (speeds, p.summary())
        assert "BF16" in [r.quant for r in p.rows]  # a candidate, shown in the table


@pytest.mark.parametrize("dtype", ["float16", "float32", None])
def test_bf16_is_no_candidate_unless_the_weights_are_bfloat16(dtype) -> None:
    """A float16 checkpoint's exact file is F16: BF16 would round its weights, however fast it runs."""
    p = plan(nemotron(dtype), cpu_machine(32), 4096, prefer="speed", cpu_speeds=BF16_FASTEST)
    assert p.chosen.quant == "F16" and "BF16" not in [r.quant for r in p.rows]
    asked = plan(nemotron(dtype), cpu_machine(32), 4096, quant="bf16")  # but --quant BF16 is always honoured
    assert asked.chosen.quant == "BF16" and asked.chosen.retention is None


def test_gpu_plans_keep_f16_unless_asked() -> None:
    shape, gpu = nemotron("bfloat16"), cpu_machine(32, vram=(24,))
    for prefer in ("fidelity", "balanced", "speed"):
        p = plan(shape, gpu, 4096, prefer=prefer, cpu_speeds=BF16_FASTEST)
        assert (p.chosen.quant, p.device) == ("F16", "gpu")
    asked = plan(shape, gpu, 4096, quant="BF16")
    assert (asked.chosen.quant, asked.device) == ("BF16", "gpu")


def test_calibration_times_bf16_where_the_cpu_has_bf16_units(tmp_path) -> None:
    avx2 = {"cpu": "AMD EPYC", "isa": ["avx", "avx2", "f16c", "fma"], "threads": 2, "llama_cpp_python": "0.3.36"}
    assert default_quants(avx2) == DEFAULT_QUANTS
    for units in ("avx512_bf16", "amx_bf16"):
        bf16 = avx2 | {"isa": [*avx2["isa"], "avx512f", units]}
        assert default_quants(bf16) == ("F16", "BF16", *DEFAULT_QUANTS[1:])
    # The cache keeps a BF16 timing and the planner reads it back.
    shape = resolve_shape("llama-embed-nemotron-8b")
    cache = tmp_path / "calibration.json"
    save(Calibration(cpu_identity(2), layer_shape(shape), CALIBRATED_LAYERS, {"F16": 9.0, "BF16": 12.0}), cache)
    assert load(shape, 2, cache).tokens_per_s == {"F16": 9.0, "BF16": 12.0}


def test_calibrate_command_times_bf16_when_named(tmp_path) -> None:
    """On this AVX2 machine BF16 is not timed by default, but `--quants` may name it: llama.cpp runs it anywhere."""
    env = {"EMBEDRUNNER_HOME": str(tmp_path)}
    args = ("calibrate", "-m", "all-minilm-l6-v2", "--quants", "F16,BF16", "--repeats", "2", "--force")
    out = run_cli(*args, env=env).stdout
    assert "BF16" in out
    (entry,) = json.loads((tmp_path / "calibration.json").read_text()).values()
    assert set(entry["tokens_per_s"]) == {"F16", "BF16"} and entry["tokens_per_s"]["BF16"] > 0


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, tokenizer_dir):
    """A tiny llama-embed-nemotron-8b-like checkpoint published in bfloat16, and its float32 reference vectors."""
    from tests.synth import build_checkpoint

    options = dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, legacy_rope_layout=True, dtype="bf16")
    hf = build_checkpoint(tmp_path_factory.mktemp("bf16") / "tiny-bf16", tokenizer_dir("llama3"),
                          "LlamaBidirectionalModel", **options)  # fmt: skip
    return hf, reference_embed(hf, texts("embedding_texts.jsonl"))


def test_a_bf16_file_matches_the_float32_reference(bf16_model, tmp_path) -> None:
    """The same bound as the F16 and F32 parity tests (tests/test_parity.py): BF16 holds these weights exactly."""
    hf, reference = bf16_model
    out = Path(run_cli("convert", str(hf), "--outdir", str(tmp_path), "--outtype", "bf16").stdout.strip())
    assert read_metadata(out)[gguf_keys.SOURCE_DTYPE] == "bfloat16" and from_gguf(out).dtype == "bfloat16"
    cos = cosines(embed_file(out, DATA / "embedding_texts.jsonl", tmp_path / "v.npy"), reference)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.999, (cos.mean(), cos.min())


def test_a_first_run_that_plans_bf16_converts_to_bf16(bf16_model, tmp_path, monkeypatch) -> None:
    """A calibration with BF16 fastest: the first --auto-quant run writes the BF16 file, no F16, and pins it; a quant
    asked for later is made from that BF16 file."""
    hf, reference = bf16_model
    home = tmp_path / "home"
    env = {"EMBEDRUNNER_HOME": str(home)}
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(home))
    shape = resolve_shape(str(hf))
    assert shape.dtype == "bfloat16"
    timed = {q: v * 100 for q, v in BF16_FASTEST.items()}
    save(Calibration(cpu_identity(probe().cores), layer_shape(shape), CALIBRATED_LAYERS, timed))
    cpu = plan_for(str(hf), hardware=replace(probe(), gpus=()))
    assert cpu.chosen.quant == "BF16" and [i.what for i in cpu.disk.items] == ["BF16"]

    first = run_cli("embed", "-m", str(hf), "--auto-quant", "--cpu", *texts("embedding_texts.jsonl")[:3],
                    "-o", str(tmp_path / "a.npy"), env=env)  # fmt: skip
    assert "plan: tiny-bf16 BF16, CPU only" in first.stderr, first.stderr
    store = home / "tiny-bf16"
    assert sorted(p.name for p in store.glob("*.gguf")) == ["tiny-bf16-BF16.gguf"]
    assert json.loads((store / "manifest.json").read_text())["pin"]["quant"] == "BF16"
    assert cosines(np.load(tmp_path / "a.npy"), reference[:3]).min() >= 0.999

    q8 = run_cli("embed", "-m", str(hf), "--quant", "Q8_0", "hi", "-o", str(tmp_path / "b.npy"), env=env)
    assert "tiny-bf16-BF16.gguf reused" in q8.stderr, q8.stderr  # made from the BF16 file: no second conversion
    assert sorted(p.name for p in store.glob("*.gguf")) == ["tiny-bf16-BF16.gguf", "tiny-bf16-Q8_0.gguf"]
    again = run_cli("embed", "-m", str(hf), "--quant", "Q8_0", "hi", "-o", str(tmp_path / "c.npy"), env=env)
    assert "quantize" not in again.stderr, again.stderr  # the Q8_0 made from the BF16 is current


def test_embed_quant_bf16_from_a_float32_checkpoint(tiny, tmp_path) -> None:
    """--quant BF16 works for any checkpoint, though only a bfloat16 one makes it a candidate."""
    model = tiny("nemotron")
    env = {"EMBEDRUNNER_HOME": str(tmp_path)}
    out = tmp_path / "v.npy"
    run_cli("embed", "-m", str(model.hf_dir), "--quant", "BF16", "--input", str(DATA / "embedding_texts.jsonl"),
            "-o", str(out), env=env)  # fmt: skip
    assert (tmp_path / model.hf_dir.name / f"{model.hf_dir.name}-BF16.gguf").is_file()
    assert cosines(np.load(out), model.reference).mean() >= 0.999  # float32 weights rounded to bfloat16
    rows = plan_for(str(tmp_path / model.hf_dir.name), hardware=replace(probe(), gpus=())).rows
    assert "BF16" not in [r.quant for r in rows]  # its file says float32: a candidate only when asked for
