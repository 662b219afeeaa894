"""Compact precisions: runner embed --precision and Embedder.encode(precision=) give sentence-transformers'
quantize_embeddings values exactly, in every output format; int8/uint8 ranges are saved for queries."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.conftest import DATA, run_cli, texts

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sentence_transformers.util.quantization import quantize_embeddings

MODEL = "all-minilm-l6-v2"  # real weights, offline, fast: 384 dimensions
TEXTS = DATA / "embedding_texts.jsonl"


@pytest.fixture(scope="module")
def float32(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("f32") / "v.npy"
    run_cli("embed", "-m", MODEL, "--input", str(TEXTS), "-o", str(out), "-q")
    return np.load(out)


def _embed(out, *flags: str, check: bool = True):
    return run_cli("embed", "-m", MODEL, "--input", str(TEXTS), "-o", str(out), "-q", *flags, check=check)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_npy_equals_quantize_embeddings(precision: str, float32, tmp_path) -> None:
    proc = _embed(tmp_path / "v.npy", "--precision", precision)
    got = np.load(tmp_path / "v.npy")
    want = quantize_embeddings(float32, precision)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.shape[1] == (48 if precision.endswith("binary") else 384)
    ranges = tmp_path / "v.npy.ranges.npy"
    if precision in ("int8", "uint8"):  # saved, and named on stderr, so queries can be quantized alike
        assert np.array_equal(np.load(ranges), np.vstack((float32.min(0), float32.max(0))))
        assert f"--ranges {ranges}" in proc.stderr
    else:
        assert not ranges.exists()


def test_queries_with_saved_ranges_and_calibration_texts(float32, tmp_path) -> None:
    _embed(tmp_path / "docs.npy", "--precision", "int8")
    saved = np.load(tmp_path / "docs.npy.ranges.npy")
    query = "what do llamas eat?"
    line = run_cli("embed", "-m", MODEL, "--query", query, "--precision", "int8", "--ranges",
                   str(tmp_path / "docs.npy.ranges.npy"), "-q").stdout  # fmt: skip
    q32 = json.loads(run_cli("embed", "-m", MODEL, "--query", query, "-q").stdout)["embedding"]
    want = quantize_embeddings(np.array([q32], np.float32), "int8", ranges=saved)[0]
    assert json.loads(line)["embedding"] == want.tolist()
    # Ranges from other texts: values outside them clip to the end buckets, as quantize_embeddings clips.
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps(t) + "\n" for t in texts("embedding_texts.jsonl")[:20]))
    _embed(tmp_path / "c.npy", "--precision", "uint8", "--calibration", str(calibration))
    run_cli("embed", "-m", MODEL, "--input", str(calibration), "-o", str(tmp_path / "cal.npy"), "-q")
    want = quantize_embeddings(float32, "uint8", calibration_embeddings=np.load(tmp_path / "cal.npy"))
    assert np.array_equal(np.load(tmp_path / "c.npy"), want)


def test_jsonl_and_parquet_carry_the_precision(float32, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _embed(tmp_path / "v.jsonl", "--precision", "binary")
    rows = [json.loads(line)["embedding"] for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert rows == quantize_embeddings(float32, "binary").tolist() and isinstance(rows[0][0], int)
    _embed(tmp_path / "v.parquet", "--precision", "uint8")
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.uint8(), 384)
    got = np.array(table.column("embedding").to_pylist(), dtype=np.uint8)
    assert np.array_equal(got, quantize_embeddings(float32, "uint8"))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--precision", "int8", "-o", None], "to stdout needs --ranges or --calibration"),
        (["--precision", "float16", "--ranges", "r.npy"], "are for --precision int8 or uint8"),
        (["--precision", "int8", "--ranges", "r.npy", "--calibration", "c.txt"], "not both"),
        (["--precision", "int8", "--ranges", "missing.npy"], "not a ranges .npy file"),
    ],
)
def test_refused_in_one_line(flags: list, message: str, tmp_path) -> None:
    args = [str(tmp_path / "v.npy") if f is None else f for f in flags]
    if "-o" in args:
        args = args[: args.index("-o")]  # stdout
    else:
        args += ["-o", str(tmp_path / "v.npy")]
    proc = run_cli("embed", "-m", MODEL, "a llama", "two llamas", "-q", *args, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_embedder_encode(float32) -> None:
    from runner import Embedder
    from runner.compact import ranges_of

    items = texts("embedding_texts.jsonl")
    with Embedder(MODEL) as model:
        for precision in ("int8", "ubinary", "float16"):
            got = model.encode(items, precision=precision)
            want = quantize_embeddings(float32, precision) if precision != "float16" else float32.astype(np.float16)
            assert got.dtype == want.dtype and np.array_equal(got, want), precision
        # The same text's float32 vector alone, not the batched run's: a vector can differ by a few 1e-7 with
        # what else is in the micro-batch, enough to cross a bucket boundary.
        alone = model.encode(items[0])[None]
        one = model.encode(items[0], precision="uint8", ranges=ranges_of(float32))
        assert np.array_equal(one, quantize_embeddings(alone, "uint8", ranges=ranges_of(float32))[0])


def _ranges_file(kind: str, path) -> None:
    if kind == "npz":  # an .npz under a .npy name (np.savez given a file object adds no suffix)
        with open(path, "wb") as f:
            np.savez(f, ranges=np.zeros((2, 384), np.float32))
    elif kind == "huge header":  # a header claiming 800 GB of float32: refused before a byte of it is read
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2, 10**11)})
    elif kind == "beyond float32":  # finite as float64, ±inf as float32: every code would be 0
        np.save(path, np.vstack((np.full(384, -1e300), np.full(384, 1e300))))
    elif kind == "cut short":
        np.save(path, np.zeros((2, 384), np.float32))
        path.write_bytes(path.read_bytes()[:-8])


@pytest.mark.parametrize(
    "kind,message",
    [
        ("npz", "not a ranges .npy file"),
        ("huge header", "ranges must be a (2, 384) float32 or float64 array"),
        ("beyond float32", "ranges must be finite float32 values"),
        ("cut short", "bytes of ranges, not the 3072 its header says"),
    ],
)
def test_a_hostile_ranges_file_is_one_line(kind: str, message: str, tmp_path) -> None:
    """Before: AttributeError (npz), MemoryError (the huge header), and exit 0 with every code 0 (1e300)."""
    ranges = tmp_path / "r.npy"
    _ranges_file(kind, ranges)
    proc = run_cli("embed", "-m", MODEL, "a llama", "-q", "--precision", "int8", "--ranges", str(ranges), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {ranges}: ") and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "ranges,message",
    [
        (np.vstack((np.full(384, np.nan), np.ones(384))), "ranges must be finite float32 values"),
        (np.array([[-1.0], [1.0]]), "ranges must be a (2, 384) float array"),  # would broadcast over every dimension
        (np.vstack((np.ones(384), -np.ones(384))), "some minima (row 0) exceed their maxima (row 1)"),
        (np.zeros((2, 384), np.int64), "ranges must be a (2, 384) float array"),
    ],
)
def test_embedder_checks_ranges_as_the_cli_does(ranges, message: str) -> None:
    """Before: NaN ranges gave codes from NaN, a (2, 1) array was broadcast and minima above maxima accepted."""
    from quantize.errors import BadInput
    from runner import Embedder

    with Embedder(MODEL) as model, pytest.raises(BadInput, match="precision int8: ") as refused:
        model.encode(["a llama", "two llamas"], precision="int8", ranges=ranges)
    assert message in str(refused.value)
