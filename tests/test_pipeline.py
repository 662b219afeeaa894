"""The shared pipeline and the pure planner: what every front door relies on, and the bugs a review found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from planner.batching import MAX_SEQS_PER_DECODE, max_seqs, pack, token_budget
from quantize.errors import BadInput
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(run_cli("convert", "all-minilm-l6-v2").stdout.strip())


def test_planner_never_loads_llama_cpp() -> None:
    """The planning side is pure: importing it (and planning) leaves llama.cpp's native library unloaded."""
    code = (
        "import sys\n"
        "import planner, planner.policy, planner.memory, planner.batching, planner.shapes, runner.io\n"
        "from planner import HardwareOptions, plan_for\n"
        "from planner.hardware import Hardware\n"
        "hw = Hardware((), 64 * 2**30, 64 * 2**30, 8, False, 'test')\n"
        "p = plan_for('llama-embed-nemotron-8b', options=HardwareOptions(cpu=True), hardware=hw)\n"
        "assert p.chosen.quant == 'F16', p.summary()\n"
        "print('llama_cpp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_batching_packs_under_budget_and_sequence_cap() -> None:
    assert token_budget(1) == 512 and token_budget(513) == 768 and token_budget(4096) == 4096
    assert max_seqs(512) == MAX_SEQS_PER_DECODE and max_seqs(256) == 256
    lengths = [300, 10, 200, 512, 5, 5, 100]
    batches = pack(lengths, budget=512, seq_cap=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every sequence once
    for b in batches:
        assert sum(lengths[i] for i in b) <= 512 and len(b) <= 3
    assert batches[0] == [3]  # longest first: a sequence that cannot be decoded fails at once
    assert pack([], 512, 4) == []
    with pytest.raises(ValueError, match="over the budget"):
        pack([513], 512, 4)


def test_needs_breaks_down_per_device() -> None:
    from planner.memory import Settings, needs
    from planner.shapes import resolve_shape

    shape = resolve_shape("llama-embed-nemotron-8b")
    n = needs(shape, "Q4_K_M", Settings(4096), gpu_layers=(10, 6))
    assert [d.device for d in n.gpus] == ["GPU0", "GPU1"] and n.cpu.device == "CPU"
    assert n.gpu == tuple(d.weights + d.kv_cache + d.compute + d.overhead for d in n.gpus)
    assert n.gpus[0].kv_cache == 10 * n.gpus[1].kv_cache // 6 and n.cpu.kv_cache > 0  # 16 layers stay on the CPU
    assert n.ram == n.cpu.total and n.cpu.output > 0
    from planner import HardwareOptions, plan_for
    from planner.hardware import Hardware

    gpu_build = Hardware((), 64 * 2**30, 64 * 2**30, 8, True, "test")  # --vram plans layers only where they can go
    doc = plan_for("llama-embed-nemotron-8b", options=HardwareOptions(vram="12GiB"), hardware=gpu_build).as_json()
    devices = doc["chosen"]["devices"]
    assert [d["device"] for d in devices] == ["GPU0", "CPU"]
    assert devices[0]["total"] == doc["chosen"]["gpu_bytes"] and devices[1]["total"] == doc["chosen"]["ram_bytes"]
    assert {"weights", "kv_cache", "compute", "output", "head", "overhead"} <= set(devices[0])


def test_family_class_gives_the_planner_its_shapes(tmp_path) -> None:
    """Config parsing lives in the family class; broken or unknown configs are one line, not a KeyError."""
    nv = tmp_path / "nv"
    nv.mkdir()
    (nv / "config.json").write_text(json.dumps({"architectures": ["NVEmbedModel"]}))
    proc = run_cli("plan", "-m", str(nv), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "text_config" in proc.stderr, proc.stderr
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    proc = run_cli("plan", "-m", str(gpt), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "GPT2LMHeadModel is not supported" in proc.stderr


def test_embedder_rejects_a_batch_size_below_one(minilm) -> None:
    from runner import Embedder

    with Embedder(str(minilm)) as model:
        for bad in (0, -3):
            with pytest.raises(BadInput, match="batch_size"):
                model.encode(["a", "b", "c"], batch_size=bad)
        assert model.encode(["a", "b", "c"], batch_size=1).shape == (3, 384)


def test_errors_number_inputs_across_chunks(minilm, tmp_path) -> None:
    src = tmp_path / "in.txt"
    # A blank line is the reader's error (naming in.txt:5); a text over --max-length is the pipeline's.
    src.write_text("one\ntwo\nthree\nfour\n" + "word " * 40 + "\nsix\n")
    options = ("--input", str(src), "--chunk-size", "2", "--max-length", "16", "--no-truncate")
    proc = run_cli("embed", "-m", str(minilm), *options, check=False)
    assert proc.returncode == 1 and "input 5: " in proc.stderr and "over the limit of 16" in proc.stderr, proc.stderr
    from runner import Embedder

    with Embedder(str(minilm)) as model, pytest.raises(BadInput, match="input 5: "):
        model.encode(["one", "two", "three", "four", " ", "six"], batch_size=2)


def test_truncation_follows_the_plan(tiny, tmp_path) -> None:
    """A bare GGUF (no registry entry, trained for 8192 here) is cut where the plan says, not at n_ctx_train."""
    gguf = tiny("nemotron").gguf("f16")
    long_text = "word " * 3000
    proc = run_cli("embed", "-m", str(gguf), "--auto-quant", "--cpu", "--max-length", "64", long_text, "-q")
    assert "truncated 1 input(s) to 64 tokens" in proc.stderr
    from runner import Embedder

    with Embedder(str(gguf), quant="auto") as model:
        assert model.max_length == model.plan.settings.max_length


def test_default_length_is_capped_like_the_plan(tiny) -> None:
    from planner import HardwareOptions, plan_for
    from planner.policy import MAX_LENGTH_CAP, max_length_for
    from runner import Embedder

    gguf = str(tiny("nemotron").gguf("f16"))
    with Embedder(gguf) as model:
        assert model.max_length == max_length_for(None, None, model.pipeline.engine.n_ctx_train)
        assert model.max_length == plan_for(gguf, options=HardwareOptions(cpu=True)).settings.max_length
    assert max_length_for(None, None, 131072) == MAX_LENGTH_CAP and max_length_for(None, 256, 512) == 256
    assert max_length_for(10**9, None, 4096) == 4096
    with pytest.raises(BadInput, match="at least 1"):
        max_length_for(0, None, 4096)


def test_checkpoint_directory_is_converted_once(tiny, tmp_path) -> None:
    """`-m HF_DIR` converts on the first run, reuses the GGUF while the source is unchanged, redoes it after."""
    import shutil

    hf = tmp_path / "ckpt"
    shutil.copytree(tiny("mistral").hf_dir, hf)
    home = tmp_path / "home"
    env = {"EMBEDRUNNER_HOME": str(home)}
    first = run_cli("embed", "-m", str(hf), "hello", "-q", env=env)
    f16 = home / "ckpt" / "ckpt-F16.gguf"
    made = f16.stat().st_mtime_ns
    manifest = json.loads((home / "ckpt" / "manifest.json").read_text())["files"]
    assert manifest["ckpt-F16.gguf"]["quant"] == "F16"
    second = run_cli("embed", "-m", str(hf), "hello", "-q", env=env)
    assert f16.stat().st_mtime_ns == made and first.stdout == second.stdout
    os.utime(hf / "model.safetensors", ns=(time.time_ns(), time.time_ns()))  # the source changed
    run_cli("embed", "-m", str(hf), "hello", "-q", env=env)
    assert f16.stat().st_mtime_ns != made


def test_a_corrupt_head_is_not_retried_and_frees_the_model(tmp_path, tokenizer_dir, monkeypatch, caplog) -> None:
    """A head sha256 mismatch is CorruptModelFile at once, even with GPU layers asked for: no 16->8->4 retries."""
    import shutil

    import llama_cpp

    from quantize.convert import convert
    from quantize.errors import CorruptModelFile
    from runner.engine import open_engine
    from tests.synth import build_checkpoint

    tok = tokenizer_dir("mistral")
    one = convert(str(build_checkpoint(tmp_path / "a", tok, "NVEmbedModel", layers=1)), tmp_path / "ga")
    two = convert(str(build_checkpoint(tmp_path / "b", tok, "NVEmbedModel", layers=1, seed=1)), tmp_path / "gb")
    shutil.copy(two.parent / "b.head.gguf", one.parent / "a.head.gguf")
    freed = []
    real_free = llama_cpp.llama_model_free
    monkeypatch.setattr(llama_cpp, "llama_model_free", lambda m: (freed.append(m), real_free(m)))
    with caplog.at_level("WARNING", logger="runner"), pytest.raises(CorruptModelFile, match="does not belong"):
        open_engine(one, n_gpu_layers=8)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(freed) == 1


def test_stdin_is_streamed(minilm, tmp_path) -> None:
    """The first chunk of vectors is on disk while the writer still holds the pipe open."""
    out = tmp_path / "v.npy"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "embed", "-m", str(minilm), "--input", "-", "-o", str(out)]
        + ["--chunk-size", "2", "-q"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    parts = Path(str(out) + ".parts")
    try:
        proc.stdin.write(b"first line\nsecond line\nthird\n")
        proc.stdin.flush()
        deadline = time.time() + 120
        while not list(parts.glob("000000-*.npy")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert list(parts.glob("000000-*.npy")), "no part on disk before the pipe closed"
        proc.stdin.write(b"fourth\n")
    finally:
        proc.stdin.close()
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    assert np.load(out).shape == (4, 384)


def test_resume_refuses_other_texts(minilm, tmp_path) -> None:
    """Resume checks each part against the texts it now reads: other texts are refused, not mixed in."""
    import signal

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(f"text {i}" for i in range(400)) + "\n")
    b.write_text("\n".join(f"other {i}" for i in range(400)) + "\n")
    out = tmp_path / "v.npy"
    args = [sys.executable, "-m", "runner", "embed", "-m", str(minilm), "-o", str(out), "--chunk-size", "20"]
    proc = subprocess.Popen([*args, "--input", str(a)], stderr=subprocess.DEVNULL)
    parts = Path(str(out) + ".parts")
    deadline = time.time() + 120
    while len(list(parts.glob("*.npy"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    refused = run_cli("embed", "-m", str(minilm), "-o", str(out), "--chunk-size", "20", "--input", str(b), "--resume",
                      check=False)  # fmt: skip
    assert refused.returncode == 1 and "other inputs" in refused.stderr, refused.stderr
