"""What travels inside the GGUF, the hub path (offline, from an HF cache), and long inputs."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np

from quantize import gguf_keys
from quantize.manifest import read_metadata
from tests.conftest import embed_file, run_cli, texts
from tests.reference import cosines, hf_tokenizer, reference_embed

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_gguf_carries_hparams_tokenizer_and_provenance(tiny) -> None:
    path = tiny("nemotron").gguf("f16")
    meta = read_metadata(path)
    assert meta["general.architecture"] == "llama-embed"
    assert meta["llama-embed.attention.causal"] is False
    assert meta["llama-embed.pooling_type"] == gguf.PoolingType.MEAN
    assert meta["llama-embed.rope.freq_base"] == 500000.0
    assert meta["llama-embed.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 128000
    assert meta[gguf_keys.CONVERTER_VERSION] and meta["general.name"] == "hf"
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert "rope_freqs.weight" in tensors and "output.weight" not in tensors
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_hub_repo_id_from_offline_cache(tiny, tmp_path) -> None:
    """`runner convert owner/name` resolves through huggingface_hub (HF_HOME, HF_HUB_OFFLINE honoured)."""
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--acme--tiny-embed"
    shutil.copytree(tiny("mistral").hf_dir, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = run_cli("convert", "acme/tiny-embed", "--outdir", str(tmp_path / "out"), env=env).stdout.strip()
    meta = read_metadata(tmp_path / "out" / "tiny-embed-F16.gguf")
    assert out.endswith("tiny-embed-F16.gguf")
    assert meta[gguf_keys.SOURCE_REPO] == "acme/tiny-embed" and meta[gguf_keys.SOURCE_REVISION] == SHA
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]["tiny-embed-F16.gguf"]
    assert manifest["source_repo"] == "acme/tiny-embed" and manifest["source_revision"] == SHA
    missing = run_cli("convert", "acme/not-cached", env=env, check=False)
    assert missing.returncode == 1 and "acme/not-cached" in missing.stderr and "Traceback" not in missing.stderr


def test_long_input_gets_a_micro_batch_of_its_own_size(tiny, tmp_path) -> None:
    """A non-causal model aborts llama.cpp if a sequence outgrows the micro-batch; the engine grows it."""
    model = tiny("nemotron")
    long_text = " ".join(texts("embedding_texts.jsonl")) * 2
    n_tokens = len(hf_tokenizer(model.hf_dir)(long_text)["input_ids"])
    assert 2048 < n_tokens < 8192
    (tmp_path / "long.jsonl").write_text(json.dumps(long_text) + "\n" + json.dumps("short one") + "\n")
    got = embed_file(model.gguf("f32"), tmp_path / "long.jsonl", tmp_path / "o.npy")
    ref = reference_embed(model.hf_dir, [long_text, "short one"], batch_size=1)
    assert cosines(got, ref).min() >= 0.9999


def test_truncation_keeps_within_max_length(tiny, tmp_path) -> None:
    model = tiny("nemotron")
    (tmp_path / "long.jsonl").write_text(json.dumps(" ".join(texts("embedding_texts.jsonl"))) + "\n")
    proc = run_cli(
        "embed",
        "-m",
        str(model.gguf("f32")),
        "--input",
        str(tmp_path / "long.jsonl"),
        "--max-length",
        "64",
        "-o",
        str(tmp_path / "o.npy"),
    )
    assert "truncated 1 input(s) to 64 tokens" in proc.stderr
    ids = hf_tokenizer(model.hf_dir)(" ".join(texts("embedding_texts.jsonl")))["input_ids"][:64]
    tok = hf_tokenizer(model.hf_dir)
    ref = reference_embed(model.hf_dir, [tok.decode(ids[1:])], batch_size=1)
    assert np.isfinite(np.load(tmp_path / "o.npy")).all()
    assert cosines(np.load(tmp_path / "o.npy"), ref)[0] >= 0.999
