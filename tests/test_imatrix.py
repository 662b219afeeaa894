"""The importance matrix: collected as the embedder runs, saved as llama.cpp reads it, carried into the quantizer."""

from __future__ import annotations

import numpy as np
import pytest

from quantize import imatrix
from quantize.errors import BadInput, EngineError
from quantize.ladder import quantize
from quantize.quants import IQUANTS
from tests.conftest import DATA, texts

CALIBRATION = [imatrix.CalibrationText(t, query=i % 3 == 0) for i, t in enumerate(texts("tokenizer_corpus.jsonl")[:48])]


@pytest.fixture(scope="module")
def f16(tiny):
    return tiny("nemotron").gguf("f16")


@pytest.fixture(scope="module")
def collected(f16) -> imatrix.Imatrix:
    return imatrix.collect(f16, CALIBRATION, dataset="test")


def test_collects_every_layer_matmul_from_the_embedding_run(f16, collected) -> None:
    """Each layer weight is seen once per token; weights fed the same input (q, k, v) get the same sums."""
    from quantize.sizes import read_tensors
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    weights = {t.name for t in read_tensors(f16)[0] if t.name.startswith("blk.") and len(t.shape) == 2}
    assert set(collected.sums) == weights
    with Engine(f16) as engine:
        pipeline = Pipeline(engine)
        docs = pipeline.tokenize([t.text for t in CALIBRATION if not t.query]).tokens
        queries = pipeline.tokenize([t.text for t in CALIBRATION if t.query], query=True).tokens
    for name in weights:
        assert collected.counts[name].tolist() == [docs + queries], name
        assert np.isfinite(collected.sums[name]).all() and (collected.sums[name] > 0).all()
    q, k, v = (collected.sums[f"blk.0.attn_{x}.weight"] for x in "qkv")
    np.testing.assert_array_equal(q, k)
    np.testing.assert_array_equal(q, v)
    assert collected.tokens == docs + queries


def test_file_is_llama_cpp_imatrix_gguf(collected, tmp_path) -> None:
    """The keys and tensor names llama.cpp's common/imatrix-loader.cpp reads, ne = [columns, 1] and [1, 1]."""
    import gguf

    path = imatrix.save(collected, tmp_path / "m.imatrix.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == ["test"]
    assert reader.fields["imatrix.chunk_count"].contents() == len(CALIBRATION)
    assert reader.fields["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    assert "general.architecture" not in reader.fields
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {n + s for n in collected.sums for s in (".in_sum2", ".counts")}
    t = tensors["blk.0.ffn_down.weight.in_sum2"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [768, 1]
    assert list(tensors["blk.0.ffn_down.weight.counts"].shape) == [1, 1]
    back = imatrix.load(path)
    for name in collected.sums:
        np.testing.assert_array_equal(back.sums[name], collected.sums[name])
        np.testing.assert_array_equal(back.values(name), collected.sums[name].ravel() / collected.counts[name][0])
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["test"], collected.chunk_count, collected.chunk_size)


def test_load_refuses_what_is_not_an_imatrix(f16, tmp_path) -> None:
    with pytest.raises(BadInput, match="not an imatrix GGUF"):
        imatrix.load(f16)
    (tmp_path / "x").write_text("hello")
    with pytest.raises(BadInput, match="--imatrix"):
        imatrix.load(tmp_path / "x")


def test_quantizer_uses_the_imatrix(f16, collected, tmp_path) -> None:
    """The same quant with and without the imatrix differs, and llama.cpp reads the values: a NaN is refused."""
    from quantize.sizes import data_offset_with, read_tensors

    plain = quantize(f16, ["Q4_K_M"], tmp_path / "plain")[0]
    weighted = quantize(f16, ["Q4_K_M"], tmp_path / "imatrix", importance=collected)[0]
    added = data_offset_with(f16, imatrix.key_values(collected)) - read_tensors(f16)[1]  # the keys naming it
    assert plain.stat().st_size + added == weighted.stat().st_size
    assert plain.read_bytes()[-4096:] != weighted.read_bytes()[-4096:]
    broken = imatrix.Imatrix({k: v.copy() for k, v in collected.sums.items()}, dict(collected.counts))
    broken.sums["blk.1.ffn_up.weight"][0, 3] = np.nan
    with pytest.raises(EngineError, match="could not quantize"):
        quantize(f16, ["Q4_K_M"], tmp_path / "nan", importance=broken)
    assert not list((tmp_path / "nan").glob("*.gguf"))


def test_iquants_need_an_imatrix(f16, tmp_path) -> None:
    with pytest.raises(BadInput, match="IQ4_XS need an importance matrix"):
        quantize(f16, ["Q4_K_M", "IQ4_XS"], tmp_path)


def test_iquant_sizes_predicted_exactly(f16, collected, tmp_path) -> None:
    """quantize/sizes.py gives each i-quant's bytes exactly, and the vectors still hold."""
    from planner.shapes import from_gguf
    from quantize.sizes import data_offset_with, file_bytes, read_tensors
    from tests.conftest import embed_file
    from tests.reference import cosines

    shape = from_gguf(f16)
    specs = read_tensors(f16)[0]
    header = data_offset_with(f16, imatrix.key_values(collected))
    for path, quant in zip(quantize(f16, IQUANTS, tmp_path, importance=collected), IQUANTS, strict=True):
        predicted = file_bytes(specs, quant, header, shape.layers, shape.n_gqa)
        assert predicted == path.stat().st_size, (quant, predicted, path.stat().st_size)
    got = embed_file(tmp_path / "hf-IQ4_XS.gguf", DATA / "embedding_texts.jsonl", tmp_path / "v.npy")
    f16_vectors = embed_file(f16, DATA / "embedding_texts.jsonl", tmp_path / "f.npy")
    assert cosines(got, f16_vectors).mean() > 0.9


def test_tensor_type_overrides_are_quantized_and_sized_exactly(f16, collected, tmp_path) -> None:
    """(regex, type) overrides reach llama.cpp's quantizer, first match wins, and sizes.py predicts every tensor's
    type and the file's bytes: an overridden attn_v leaves the Q4_K_M "more bits" numbering of the others."""
    import gguf

    from planner.shapes import from_gguf
    from quantize.gguf_keys import TENSOR_TYPES
    from quantize.sizes import data_offset_with, file_bytes, read_tensors, tensor_types

    shape = from_gguf(f16)
    specs = read_tensors(f16)[0]
    overrides = [(r"^blk\.0\.attn_v\.", "Q8_0"), (r"ffn_down", "Q5_K"), (r"blk\.1\.ffn_down", "Q8_0")]
    written = ",".join(f"{rx}={t}" for rx, t in overrides)
    header = data_offset_with(f16, {**imatrix.key_values(collected), TENSOR_TYPES: written})
    (made,) = quantize(f16, ["Q4_K_M"], tmp_path, importance=collected, tensor_types=overrides)
    got = {t.name: t.tensor_type for t in gguf.GGUFReader(made).tensors}
    predicted = tensor_types(specs, "Q4_K_M", shape.layers, shape.n_gqa, overrides)
    assert got == predicted
    assert got["blk.0.attn_v.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert {got[n] for n in got if "ffn_down" in n} == {gguf.GGMLQuantizationType.Q5_K}  # the first match wins
    assert made.stat().st_size == file_bytes(specs, "Q4_K_M", header, shape.layers, shape.n_gqa, overrides)
    assert tensor_types(specs, "Q4_K_M", shape.layers, shape.n_gqa) != predicted
    from quantize.manifest import entries

    entry = entries(tmp_path)[made.name]
    assert entry["tensor_types"] == [f"{rx}={t}" for rx, t in overrides]
    assert entry["imatrix"]["file"] == "(not saved)" and entry["imatrix"]["datasets"] == ["test"]
    with pytest.raises(BadInput, match="tensor type ffn_down=Q9_9"):
        quantize(f16, ["Q4_K_M"], tmp_path / "bad", tensor_types=[("ffn_down", "Q9_9")])


def test_causal_chunks_collect_as_llama_imatrix_does(f16, collected) -> None:
    """llama-imatrix's procedure: whole 512-token chunks of the joined text, the remainder dropped, and causal
    attention (the same text run bidirectionally, as this embedder runs, gives other sums past the first layer's
    input)."""
    from runner.engine import Engine

    many = CALIBRATION * 8
    causal = imatrix.collect_causal_chunks(f16, many, dataset="test", chunk=128)
    with Engine(f16) as engine:
        n_tokens = len(engine.tokenize("\n".join(t.text for t in many)))
    assert causal.chunk_size == 128 and causal.chunk_count == n_tokens // 128 >= 2
    assert set(causal.counts) == set(collected.counts)
    assert {float(c[0]) for c in causal.counts.values()} == {causal.chunk_count * 128.0}
    bidirectional = imatrix.Imatrix()
    with Engine(f16) as engine:
        engine.eval_callback, engine.causal = imatrix._Collector(bidirectional).callback, False
        tokens = engine.tokenize("\n".join(t.text for t in many))
        for i in range(causal.chunk_count):
            part = tokens[i * 128 : (i + 1) * 128].copy()
            if engine.bos is not None:
                part[0] = engine.bos
            engine.embed_tokens([part])
    np.testing.assert_allclose(causal.sums["blk.0.attn_q.weight"], bidirectional.sums["blk.0.attn_q.weight"], rtol=1e-5)
    assert not np.allclose(causal.sums["blk.0.ffn_up.weight"], bidirectional.sums["blk.0.ffn_up.weight"], rtol=1e-3)
    with pytest.raises(BadInput, match="causal chunks of 512 need at least 1024"):
        imatrix.collect_causal_chunks(f16, CALIBRATION[:2], dataset="test")


def test_cli_imatrix_then_quantize_with_it(f16, tmp_path) -> None:
    """`runner imatrix` writes the file; `runner quantize --imatrix FILE` makes an i-quant; without one: one line."""
    from tests.conftest import run_cli

    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(t.text.replace("\n", " ") for t in CALIBRATION[:20]) + "\n", encoding="utf-8")
    out = run_cli("imatrix", "-m", str(f16), "--texts", str(cal), "-o", str(tmp_path / "m.gguf"))
    assert out.stdout.strip() == str(tmp_path / "m.gguf")
    assert "imatrix: 20 texts" in out.stderr
    assert imatrix.load(tmp_path / "m.gguf").datasets == ["cal.txt"]
    made = run_cli(
        "quantize", str(f16), "--quant", "IQ3_XXS", "--imatrix", str(tmp_path / "m.gguf"), "--outdir", str(tmp_path)
    )
    assert made.stdout.strip() == str(tmp_path / "hf-IQ3_XXS.gguf")
    refused = run_cli("quantize", str(f16), "--quant", "iq2_m", "--outdir", str(tmp_path), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "IQ2_M need an importance matrix: add --imatrix auto" in refused.stderr
    bad = run_cli(
        "quantize", str(f16), "--quant", "Q4_K_M", "--imatrix", str(cal), "--outdir", str(tmp_path), check=False
    )
    assert bad.returncode == 1 and f"--imatrix {cal}: not an imatrix GGUF" in bad.stderr
    assert not (tmp_path / "hf-Q4_K_M.gguf").exists()


def test_cli_quantize_imatrix_auto_collects_once(f16, tmp_path) -> None:
    """--imatrix auto measures the model on the shipped set, keeps it beside the model, and reuses it."""
    import shutil

    from tests.conftest import run_cli

    model = tmp_path / "hf-F16.gguf"
    shutil.copyfile(f16, model)
    first = run_cli("quantize", str(model), "--quant", "Q4_K_M", "--imatrix", "auto")
    kept = tmp_path / "hf-F16.imatrix.gguf"
    assert "texts" in first.stderr and str(kept) in first.stderr
    shipped = imatrix.calibration_texts()
    assert imatrix.load(kept).chunk_count == len(shipped) and imatrix.load(kept).datasets == [imatrix.CALIBRATION]
    second = run_cli("quantize", str(model), "--quant", "IQ4_XS", "--imatrix", "auto")
    assert f"imatrix: reusing {kept}" in second.stderr
    # The quant and the manifest name the matrix: llama-quantize's keys and its sha256.
    from quantize.files import sha256
    from quantize.manifest import entries, read_metadata

    recorded = entries(tmp_path)["hf-IQ4_XS.gguf"]["imatrix"]
    assert recorded == {
        "file": kept.name,
        "sha256": sha256(kept),
        "datasets": [imatrix.CALIBRATION],
        "chunks": len(shipped),
        "weights": len(imatrix.load(kept).sums),
    }
    meta = read_metadata(tmp_path / "hf-IQ4_XS.gguf")
    assert meta["quantize.imatrix.file"] == kept.name and meta["quantize.imatrix.chunks_count"] == len(shipped)


def test_cli_tensor_type(f16, tmp_path) -> None:
    """`runner quantize --tensor-type REGEX=TYPE`: the tensors get the type and the manifest says so; a malformed
    option or an unknown type is one line, before anything is written."""
    import gguf

    from quantize.manifest import entries
    from tests.conftest import run_cli

    made = run_cli(
        "quantize", str(f16), "--quant", "Q4_K_M", "--tensor-type", "ffn_down=Q8_0", "--outdir", str(tmp_path)
    )
    path = tmp_path / "hf-Q4_K_M.gguf"
    assert made.stdout.strip() == str(path)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors if "ffn_down" in t.name}
    assert set(types.values()) == {gguf.GGMLQuantizationType.Q8_0}
    assert entries(tmp_path)[path.name]["tensor_types"] == ["ffn_down=Q8_0"]
    for bad, says in (("ffn_down", "expected REGEX=TYPE"), ("ffn_down=Q9", "tensor type ffn_down=Q9")):
        out = run_cli(
            "quantize", str(f16), "--quant", "Q2_K", "--tensor-type", bad, "--outdir", str(tmp_path), check=False
        )
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and says in out.stderr, out.stderr
    assert not (tmp_path / "hf-Q2_K.gguf").exists()


def test_auto_collects_from_q8_0_where_f16_does_not_fit(f16, tmp_path) -> None:
    """--imatrix auto on a machine whose RAM holds the Q8_0 but not the F16: the matrix comes from the Q8_0
    (made beside it), and the quant is made from the F16 with it. With a GPU, the Q8_0 wins where it goes whole on
    the GPU and the F16 would not; the F16 wins where it does."""
    import shutil

    from planner import plan_for
    from planner.hardware import Gpu, Hardware
    from quantize.progress import Progress
    from quantize.store import quant_path

    model = tmp_path / "hf-F16.gguf"
    shutil.copyfile(f16, model)
    roomy = Hardware((), 64 * 2**30, 64 * 2**30, 2, True, "test")
    need = {q: plan_for(str(f16), q, imatrix.COLLECTION_LENGTH, hardware=roomy).chosen.needs for q in ("F16", "Q8_0")}
    ram = (need["F16"].ram + need["Q8_0"].ram) // 2 + 2**30  # the planner keeps 1 GiB back
    tight = Hardware((), ram, ram, 2, True, "test")
    said: list[str] = []
    found = imatrix.for_quantize("auto", model, progress=Progress(say=said.append), hardware=tight)
    q8 = quant_path(model, "Q8_0")
    assert q8.is_file() and any(f"collecting from {q8.name}" in line for line in said), said
    assert imatrix.auto_path(model).is_file() and set(found.sums) == set(imatrix.load(imatrix.auto_path(model)).sums)
    assert imatrix.collection_plan(model, roomy)[0] is None
    big_gpu = Hardware((Gpu(0, "test", 64 * 2**30, 64 * 2**30),), 64 * 2**30, 64 * 2**30, 2, True, "test")
    on_gpu = {q: plan_for(str(f16), q, imatrix.COLLECTION_LENGTH, hardware=big_gpu).chosen.needs for q in need}
    vram = (on_gpu["F16"].gpu_total + on_gpu["Q8_0"].gpu_total) // 2 + 2**30
    small_gpu = Hardware((Gpu(0, "test", vram, vram),), 64 * 2**30, 64 * 2**30, 2, True, "test")
    quant, plan = imatrix.collection_plan(model, small_gpu)
    assert quant == "Q8_0" and plan.chosen.fits == "gpu"
    quant, plan = imatrix.collection_plan(model, big_gpu)
    assert quant is None and plan.chosen.fits == "gpu" and plan.chosen.n_gpu_layers > 0
    with pytest.raises(BadInput):  # nothing fits: the planner's one line
        imatrix.collection_plan(model, Hardware((), 2**30, 2**30, 2, True, "test"))


def test_sensitivity_bench_groups_and_ranking(f16) -> None:
    """bench.tensor_sensitivity: one group per tensor class and per band of layers, each a regex naming only its
    tensors; rows ranked by the share of the base's loss they remove per added MiB."""
    import re

    from bench.tensor_sensitivity import Variant, groups, table
    from quantize.sizes import read_tensors

    names = [t.name for t in read_tensors(f16)[0]]
    found = dict(groups(f16, ["classes", "layers"], band=1))
    assert {"attn_v", "ffn_down", "layers 0-0"} <= set(found)
    assert [n for n in names if re.search(found["attn_v"], n)] == [n for n in names if n.endswith("attn_v.weight")]
    assert all(n.startswith("blk.0.") for n in names if re.search(found["layers 0-0"], n))
    base = Variant("base", "", 100.0, 0.99, 0.9, 0.9)
    rows = [Variant("big", "b", 110.0, 0.995, 0.9, 0.9), Variant("small", "s", 100.5, 0.994, 0.9, 0.9)]
    lines = table(base, rows, markdown=True).splitlines()
    assert lines[2].startswith("| base") and lines[3].startswith("| small") and "40.0%" in lines[3]
