"""Retention measured on the model itself: `runner retention` records each quant's cosines to its F16 file and
top-10 neighbour overlap in manifest.json; `runner plan` shows the model's own figures ("unmeasured" otherwise),
and --prefer balanced counts only them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner import HardwareOptions, plan_for
from planner.calibration import CALIBRATED_LAYERS, Calibration, cpu_identity, layer_shape, save
from planner.hardware import probe
from planner.shapes import resolve_shape
from quantize import manifest
from quantize.ladder import quantize
from quantize.progress import Progress
from runner import retention
from tests.conftest import run_cli

MINILM = "all-minilm-l6-v2"
Q8_FASTEST = {"F16": 800.0, "Q8_0": 1200.0, "Q6_K": 1000.0}  # tokens/s a calibration could report


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A models home with MiniLM's F16 and Q8_0, Q6_K; nothing measured."""
    home = tmp_path_factory.mktemp("home")
    f16 = run_cli("convert", MINILM, env={"EMBEDRUNNER_HOME": str(home)}).stdout.strip()
    quantize(Path(f16), ["Q8_0", "Q6_K"])  # the library call: `runner quantize` would measure them (quickly) too
    return home


def bare(home: Path) -> None:
    """HOME's MiniLM manifest without measured figures."""
    path = home / MINILM / manifest.MANIFEST
    doc = json.loads(path.read_text())
    for entry in doc["files"].values():
        entry.pop(manifest.RETENTION, None)
    path.write_text(json.dumps(doc))


def test_runner_plan_shows_the_models_own_figures(home, monkeypatch) -> None:
    env = {"EMBEDRUNNER_HOME": str(home)}
    bare(home)
    before = [line for line in run_cli("plan", "-m", MINILM, "--cpu", env=env).stdout.splitlines()
              if line[2:].startswith(("Q8_0", "Q6_K"))]  # fmt: skip
    assert len(before) == 2 and all("unmeasured" in line for line in before)
    out = run_cli("retention", "-m", MINILM, "--quant", "Q8_0", "--limit", "24", "-q", env=env).stdout
    assert out.startswith("Q8_0: mean cosine 0.99") and "over 24 texts" in out
    figures = manifest.entries(home / MINILM)[f"{MINILM}-Q8_0.gguf"][manifest.RETENTION]
    assert figures["texts"] == 24 and figures["probe"] == retention.PROBE and figures["reference"].endswith("F16.gguf")
    assert 0.99 < figures["min_cosine"] <= figures["mean_cosine"] < 1 and 0.5 < figures["top10_overlap"] <= 1
    table = run_cli("plan", "-m", MINILM, "--cpu", env=env).stdout.split("\nCPU tok/s")[0]  # not the disk lines
    shown = {line[2:].split()[0]: line for line in table.splitlines()[3:]}
    assert f"{figures['mean_cosine']:.5f}" in shown["Q8_0"] and "1.00000" in shown["F16"]
    assert "unmeasured" in shown["Q6_K"]
    doc = json.loads(run_cli("plan", "-m", MINILM, "--cpu", "--json", env=env).stdout)
    rows = {r["quant"]: r["expected_cosine_to_f16"] for r in doc["quants"]}
    assert rows["Q8_0"] == figures["mean_cosine"] and rows["Q6_K"] is None and rows["F16"] == 1.0


def test_balanced_counts_only_measured_figures(home, monkeypatch) -> None:
    """Q8_0 is the fastest here; balanced takes it only once this model's own Q8_0 is measured at >= 0.999."""
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(home))
    bare(home)
    shape = resolve_shape(MINILM)
    save(Calibration(cpu_identity(probe().cores), layer_shape(shape), CALIBRATED_LAYERS,
                     {q: v * shape.layers / CALIBRATED_LAYERS for q, v in Q8_FASTEST.items()}))  # fmt: skip
    options = HardwareOptions(cpu=True)
    unmeasured = plan_for(MINILM, options=options)
    assert unmeasured.chosen.quant == "F16", unmeasured.reason
    assert "Q8_0, Q6_K faster but unmeasured" in unmeasured.reason and "runner retention" in unmeasured.reason
    figures = {"mean_cosine": 0.9996, "min_cosine": 0.999, "top10_overlap": 0.98, "texts": 272}
    manifest.record_retention(home / MINILM / f"{MINILM}-Q8_0.gguf", figures)
    measured = plan_for(MINILM, options=options)
    assert measured.chosen.quant == "Q8_0" and "measured on this model" in measured.reason, measured.reason
    manifest.record_retention(home / MINILM / f"{MINILM}-Q8_0.gguf", figures | {"mean_cosine": 0.998})
    assert plan_for(MINILM, options=options).chosen.quant == "F16"  # measured, but below 0.999
    assert plan_for(MINILM, options=HardwareOptions(cpu=True, prefer="speed")).chosen.quant == "Q8_0"


@pytest.mark.parametrize("bad", ["0.9999", {"mean_cosine": 2.0}, {"mean_cosine": "high"}, {"mean_cosine": True}])
def test_a_figure_that_is_no_measurement_is_ignored(home, caplog, bad) -> None:
    bare(home)
    path = home / MINILM / manifest.MANIFEST
    doc = json.loads(path.read_text())
    good = {"mean_cosine": 0.9996, "min_cosine": 0.999, "top10_overlap": 0.98}
    doc["files"][f"{MINILM}-Q8_0.gguf"][manifest.RETENTION] = bad if isinstance(bad, str) else good | bad
    path.write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="runner"):
        assert manifest.retention(home / MINILM) == {}
    assert "not a measurement" in caplog.text


def test_the_default_probe_stays_within_its_time(home, monkeypatch) -> None:
    """A slow machine (a fabricated clock: 10 s per engine call) gets a cut probe, and says how to run it all;
    when a quant is made it is not measured at all, and a line says how to."""
    bare(home)
    ticks = iter(range(0, 10**6, 10))
    found = retention.measure(home / MINILM, ["Q8_0"], seconds=120, clock=lambda: next(ticks))
    assert retention.TOP_K < found["Q8_0"].texts < 40
    said = []
    monkeypatch.setattr(retention, "AUTO_SECONDS", 1e-6)
    made = home / MINILM / f"{MINILM}-Q6_K.gguf"
    assert retention.after_quantize(made, progress=Progress(say=said.append)) is None
    assert said and "not measured" in said[0] and f"runner retention -m {made.parent} --quant Q6_K" in said[0]
    assert "retention" not in manifest.entries(home / MINILM)[made.name]


def test_refusals(home) -> None:
    env = {"EMBEDRUNNER_HOME": str(home)}
    for args, message in [
        (["--quant", "Q4_K_M"], "no Q4_K_M file"),
        (["--quant", "F16"], "the quants are measured against it"),
        (["--limit", "1"], "--limit"),
    ]:
        proc = run_cli("retention", "-m", MINILM, *args, env=env, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
