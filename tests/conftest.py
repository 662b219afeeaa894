"""Shared fixtures: tiny random checkpoints of each supported architecture, converted once per session."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.synth import LLAMA3_ROPE

DATA = Path(__file__).parent / "data"
# name -> (architecture, tokenizer, build options, convert flags)
TINY = {
    # llama-embed-nemotron-8b's layout: LlamaBidirectionalModel, Llama-3 BPE, Llama-3.1 rope scaling,
    # transformers-4 config keys (rope_theta + rope_scaling).
    "nemotron": (
        "LlamaBidirectionalModel",
        "llama3",
        dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, legacy_rope_layout=True),
        [],
    ),
    # A plain Mistral trunk with the Mistral-7B SentencePiece tokenizer.
    "mistral": ("MistralModel", "mistral", dict(rope_theta=1e6), []),
    # A causal LM declared as an embedder, transformers-5 config keys (rope_parameters).
    "llama-causal": ("LlamaForCausalLM", "smollm2", dict(), ["--as-embedder"]),
}


def texts(name: str) -> list[str]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").split("\n") if line]


def run_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`runner ARGS` in a fresh process, so a crash inside llama.cpp fails the test instead of pytest."""
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"runner {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def embed_file(model: str | Path, input_file: Path, out: Path, *extra: str) -> np.ndarray:
    run_cli("embed", "-m", str(model), "--input", str(input_file), "-o", str(out), *extra)
    return np.load(out)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n auto`, pyproject's default) each worker runs on a core of its own, and so do the
    runs it starts: llama.cpp sizes its threads to the cores it may use (planner.hardware.usable_cores), and
    two workers each spinning threads on every core would slow each other far more than they gain."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")):
            os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})


@pytest.fixture(autouse=True, scope="session")
def _models_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["EMBEDRUNNER_HOME"] = str(tmp_path_factory.mktemp("models-home"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    from tests import hf_tokenizers

    builders = {
        "llama3": hf_tokenizers.llama3_tokenizer_dir,
        "mistral": hf_tokenizers.mistral_tokenizer_dir,
        "smollm2": hf_tokenizers.smollm2_tokenizer_dir,
        "qwen2": hf_tokenizers.qwen2_tokenizer_dir,
        "qwen2-eos": functools.partial(hf_tokenizers.qwen2_tokenizer_dir, append_eos=True),
        "mistral-eos": functools.partial(hf_tokenizers.mistral_tokenizer_dir, append_eos=True),
    }
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = builders[name](tmp_path_factory.mktemp(f"tok-{name}"))
        return made[name]

    return get


@dataclass
class TinyModel:
    name: str
    hf_dir: Path
    convert_flags: list[str]
    ggufs: dict[str, Path]
    reference: np.ndarray  # tests/data/embedding_texts.jsonl through transformers

    def gguf(self, outtype: str) -> Path:
        if outtype not in self.ggufs:
            out = run_cli(
                "convert",
                str(self.hf_dir),
                "--outdir",
                str(self.hf_dir.parent / "gguf"),
                "--outtype",
                outtype,
                *self.convert_flags,
            ).stdout.strip()
            self.ggufs[outtype] = Path(out)
        return self.ggufs[outtype]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir):
    from tests.reference import reference_embed
    from tests.synth import build_checkpoint

    made: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in made:
            arch, tok, options, flags = TINY[name]
            hf_dir = build_checkpoint(tmp_path_factory.mktemp(name) / "hf", tokenizer_dir(tok), arch, **options)
            ref = reference_embed(hf_dir, texts("embedding_texts.jsonl"))
            made[name] = TinyModel(name, hf_dir, flags, {}, ref)
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_last(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir):
    """Tiny last-token embedders (tests/last_token.py) with their reference vectors; converted with the
    flags that declare their pooling and attention."""
    from tests.last_token import LAST_TOKEN, convert_flags, reference_last_token
    from tests.synth import build_checkpoint

    made: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in made:
            arch, tok, causal, options = LAST_TOKEN[name]
            try:
                tok_dir = tokenizer_dir(tok)
            except FileNotFoundError as e:  # the Qwen2 vocabulary comes from llama.cpp's sdist
                pytest.skip(str(e))
            hf_dir = build_checkpoint(tmp_path_factory.mktemp(name) / "hf", tok_dir, arch, **options)
            ref = reference_last_token(hf_dir, texts("embedding_texts.jsonl"), causal)
            made[name] = TinyModel(name, hf_dir, convert_flags(name), {}, ref)
        return made[name]

    return get
