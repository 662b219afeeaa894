"""Bad input: one line naming the input, non-zero exit, no traceback, nothing half-written left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_path(tmp_path) -> None:
    missing = str(tmp_path / "nope")
    assert_one_line_error(run_cli("convert", missing, check=False), missing)


def test_directory_without_config(tmp_path) -> None:
    assert_one_line_error(run_cli("convert", str(tmp_path), check=False), str(tmp_path), "config.json")


def test_unsupported_architecture(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    proc = run_cli("convert", str(tmp_path), check=False)
    assert_one_line_error(proc, "GPT2LMHeadModel", "LlamaBidirectionalModel")


def test_causal_lm_needs_declaring(tiny, tmp_path) -> None:
    proc = run_cli("convert", str(tiny("llama-causal").hf_dir), "--outdir", str(tmp_path), check=False)
    assert_one_line_error(proc, "LlamaForCausalLM", "--as-embedder")


def test_corrupt_safetensors(tiny, tmp_path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny("mistral").hf_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    assert_one_line_error(run_cli("convert", str(bad), "--outdir", str(out), check=False), "model.safetensors")
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*"))


def test_truncated_gguf(tiny, tmp_path) -> None:
    gguf = tiny("mistral").gguf("f16")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size * 2 // 3])
    assert_one_line_error(run_cli("embed", "-m", str(cut), "hello", check=False), str(cut))


def test_not_a_gguf(tmp_path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello")
    assert_one_line_error(run_cli("embed", "-m", str(junk), "hello", check=False), str(junk))


def test_empty_text(tiny, tmp_path) -> None:
    gguf = str(tiny("mistral").gguf("f16"))
    assert_one_line_error(run_cli("embed", "-m", gguf, "fine", "", check=False), "input 2", "empty")
    lines = tmp_path / "in.txt"
    lines.write_text("one\n\nthree\n")
    assert_one_line_error(run_cli("embed", "-m", gguf, "--input", str(lines), check=False), f"{lines}:2: blank line")


def test_an_unknown_output_extension_lists_every_format(tmp_path) -> None:
    proc = run_cli("embed", "-m", "x", "hello", "-o", str(tmp_path / "v.bin"), check=False)
    assert_one_line_error(proc, f"{tmp_path / 'v.bin'}: cannot tell the format", "--format npy, jsonl or parquet")


def test_invalid_utf8_names_the_line(tiny, tmp_path) -> None:
    bad = tmp_path / "in.txt"
    bad.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    proc = run_cli("embed", "-m", str(tiny("mistral").gguf("f16")), "--input", str(bad), check=False)
    assert_one_line_error(proc, f"{bad}:3")


def test_unknown_model_name() -> None:
    assert_one_line_error(run_cli("embed", "-m", "no-such-model", "hi", check=False), "no-such-model")


def test_debug_shows_traceback(tmp_path) -> None:
    proc = run_cli("--debug", "convert", str(tmp_path), check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_nothing_half_written_on_failure(tmp_path) -> None:
    from quantize.files import atomic_path

    target = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError, match="crash mid-write"):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
