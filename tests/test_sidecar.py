"""Every output file names the model file that made it: `<output>.json` beside a .npy or .jsonl output, the same
JSON in a parquet output's schema metadata (model, quant, file, sha256, pooling, dimensions, precision,
normalisation, max length, rows). The sha256 is the one manifest.json records: an 8B file is not hashed again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planner import HardwareOptions
from quantize.errors import BadInput
from runner.io import PARQUET_METADATA_KEY, VectorSink, sidecar_path
from tests.conftest import run_cli

MINILM = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A models home of its own (the pins here must not move other tests' models) with MiniLM pinned at Q8_0."""
    home = tmp_path_factory.mktemp("sidecar-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDRUNNER_HOME", str(home))
        run_cli("embed", "-m", MINILM, "--quant", "Q8_0", "-q", "warm up")
        yield home


def recorded(home: Path, name: str) -> str:
    return json.loads((home / MINILM / "manifest.json").read_text())["files"][name]["sha256"]


@pytest.mark.parametrize("suffix", ["npy", "jsonl"])
def test_npy_and_jsonl_outputs_get_a_sidecar(home, tmp_path, suffix) -> None:
    out = tmp_path / f"v.{suffix}"
    proc = run_cli("embed", "-m", MINILM, "a llama", "two llamas", "-o", str(out), "--precision", "int8")
    assert f"{MINILM}-Q8_0.gguf, Q8_0)" in proc.stderr  # the summary line names file and quant
    file = f"{MINILM}-Q8_0.gguf"
    assert json.loads(sidecar_path(out).read_text()) == {
        "model": MINILM,
        "quant": "Q8_0",
        "file": file,
        "sha256": recorded(home, file),
        "pooling": "mean",
        "dimensions": 384,
        "precision": "int8",
        "normalize": True,
        "max_length": 256,
        "query": False,
        "task": None,
        "rows": 2,
    }
    assert sidecar_path(out) == tmp_path / f"v.{suffix}.json"

    # Another file for the same output: the sidecar follows it.
    run_cli("embed", "-m", MINILM, "--quant", "F16", "a llama", "-o", str(out), "-q")
    side = json.loads(sidecar_path(out).read_text())
    assert (side["quant"], side["file"], side["rows"]) == ("F16", f"{MINILM}-F16.gguf", 1)
    assert side["sha256"] == recorded(home, f"{MINILM}-F16.gguf")
    run_cli("embed", "-m", MINILM, "--quant", "Q8_0", "a llama", "-q")  # back to the module's pin


def test_parquet_outputs_carry_it_in_their_schema(home, tmp_path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "v.parquet"
    run_cli("embed", "-m", MINILM, "a llama", "-o", str(out), "-q")
    meta = json.loads(pq.read_schema(out).metadata[PARQUET_METADATA_KEY])
    assert (meta["model"], meta["quant"], meta["file"], meta["rows"]) == (MINILM, "Q8_0", f"{MINILM}-Q8_0.gguf", 1)
    assert meta["sha256"] == recorded(home, f"{MINILM}-Q8_0.gguf") and meta["dimensions"] == 384
    assert not sidecar_path(out).exists()


def test_the_sha256_is_the_recorded_one_not_a_rehash(home, tmp_path, monkeypatch) -> None:
    from quantize import manifest
    from runner.embed_run import run_embed
    from runner.pipeline import open_pipeline

    monkeypatch.setenv("EMBEDRUNNER_HOME", str(home))

    def no_hashing(*_):
        raise AssertionError("hashed the model file again")

    monkeypatch.setattr(manifest, "sha256", no_hashing)
    with open_pipeline(MINILM) as pipeline:
        run_embed(pipeline, ["a llama"], str(tmp_path / "v.npy"))
    assert json.loads(sidecar_path(tmp_path / "v.npy").read_text())["sha256"] == recorded(home, f"{MINILM}-Q8_0.gguf")


def test_an_output_replaced_without_metadata_loses_the_old_sidecar(tmp_path) -> None:
    """The old sidecar goes before the new output takes its name: never an output described by another's."""
    out = tmp_path / "v.npy"
    for metadata in ({"model": "m", "quant": "F16"}, None):
        sink = VectorSink(str(out), "npy", "float32", "key", False, dims=4)
        sink.write(0, "0" * 64, np.ones((3, 4), np.float32), 0)
        sink.finish(metadata)
        assert np.load(out).shape == (3, 4)
        if metadata:
            assert json.loads(sidecar_path(out).read_text()) == metadata | {"rows": 3}
    assert not sidecar_path(out).exists()


def test_the_server_ids_carry_the_quant_as_a_tag(home) -> None:
    """Ollama's name:tag: `all-minilm-l6-v2:Q8_0` in every response's `model`, /v1/models and /api/tags; the bare
    name is an alias in requests, another quant is not served here."""
    from runner.pipeline import open_pipeline
    from tests.test_server_hostile import app_client

    tagged = f"{MINILM}:Q8_0"
    with app_client(lambda: open_pipeline(MINILM)) as client:  # the module's pin
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [tagged]
        (entry,) = client.get("/api/tags").json()["models"]
        assert entry["name"] == entry["model"] == tagged and entry["details"]["quantization_level"] == "Q8_0"
        assert entry["digest"] == recorded(home, f"{MINILM}-Q8_0.gguf")
        for asked in ({"model": tagged}, {"model": MINILM}, {}):
            assert client.post("/v1/embeddings", json={"input": "a llama"} | asked).json()["model"] == tagged
            assert client.post("/api/embed", json={"input": "a llama"} | asked).json()["model"] == tagged
        other = client.post("/v1/embeddings", json={"input": "a llama", "model": f"{MINILM}:F16"})
        assert other.status_code == 404 and repr(tagged) in other.text
        assert client.get("/health").json()["model"] == tagged


def test_embed_dataset_records_the_model_file_once_per_folder_and_checks_it(home, tmp_path, monkeypatch) -> None:
    from runner.distributed import RUN_FILE, _model_file, prepare_output, run_record

    monkeypatch.setenv("EMBEDRUNNER_HOME", str(home))
    (tmp_path / "in.txt").write_text("a llama\n")
    files, options, out = [str(tmp_path / "in.txt")], dict(column="text", query=False), tmp_path / "out"
    pinned = _model_file(MINILM, "auto", None, HardwareOptions(cpu=True))
    prepare_output(out, run_record(files, pinned, **options), overwrite=False)
    q8 = f"{MINILM}-Q8_0.gguf"
    assert json.loads((out / RUN_FILE).read_text())["model"] == {
        "model": MINILM, "quant": "Q8_0", "file": q8, "sha256": recorded(home, q8), "pooling": "mean"
    }  # fmt: skip
    f16 = _model_file(MINILM, "F16", None, None)
    try:
        with pytest.raises(BadInput, match=rf"another model file \(-m/--quant\) \({q8} \(Q8_0, sha256 \w{{12}}\), now "
                           rf"{MINILM}-F16.gguf \(F16, "):  # fmt: skip
            prepare_output(out, run_record(files, f16, **options), overwrite=False)
    finally:
        _model_file(MINILM, "Q8_0", None, None)  # back to the module's pin
