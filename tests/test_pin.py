"""One model name, one file: once a model's quant is chosen (--quant, --auto-quant or the first run), its runs in
every front door use that file until --quant picks another; a calibration or a plan that would now choose
otherwise never moves the pin silently. The pin lives in the model directory's manifest.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner import HardwareOptions, plan_for
from planner.calibration import CALIBRATED_LAYERS, Calibration, cpu_identity, layer_shape, save
from planner.hardware import probe
from planner.shapes import resolve_shape
from quantize import manifest
from tests.conftest import run_cli

MINILM = "all-minilm-l6-v2"
# Tokens/s a calibration could report on some CPU: Q6_K fastest, so a balanced CPU plan picks Q6_K, not F16.
Q6K_FASTEST = {"F16": 6.8, "Q8_0": 7.6, "Q6_K": 12.9, "Q5_K_M": 11.0, "Q5_K_S": 11.2, "Q4_K_M": 10.3}


def pin_in(directory: Path) -> str | None:
    held = json.loads((directory / "manifest.json").read_text()).get("pin")
    return held and held["quant"]


def test_the_pin_survives_a_calibration_and_an_auto_quant_run(tmp_path, monkeypatch) -> None:
    env = {"EMBEDRUNNER_HOME": str(tmp_path)}
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(tmp_path))
    home = tmp_path / MINILM
    first = run_cli("embed", "-m", MINILM, "hi", env=env)
    assert f"pinned F16 ({MINILM}-F16.gguf): runs of this model use it" in first.stderr, first.stderr
    assert pin_in(home) == "F16"

    # A calibration after which the plan for this machine picks Q6_K (--prefer speed: balanced would wait for a
    # measured retention of this model's Q6_K): it changes no pin.
    shape = resolve_shape(MINILM)
    save(Calibration(cpu_identity(probe().cores), layer_shape(shape), CALIBRATED_LAYERS, dict(Q6K_FASTEST)))
    assert plan_for(MINILM, options=HardwareOptions(cpu=True, prefer="speed")).chosen.quant == "Q6_K"
    auto = run_cli("embed", "-m", MINILM, "--auto-quant", "--cpu", "--prefer", "speed", "hi", env=env)
    assert f"pinned F16 ({MINILM}-F16.gguf) kept; the plan for this machine picks Q6_K" in auto.stderr
    assert "--quant Q6_K moves the pin" in auto.stderr and f"{MINILM}-F16.gguf, F16 on cpu)" in auto.stderr
    assert pin_in(home) == "F16" and not (home / f"{MINILM}-Q6_K.gguf").exists()
    from runner.distributed import _model_file  # runner embed-dataset's resolution (its default quant is auto)

    assert _model_file(MINILM, "auto", None, HardwareOptions(cpu=True)).quant == "F16"
    plain = run_cli("embed", "-m", MINILM, "hi", env=env)
    assert f"{MINILM}-F16.gguf, F16)" in plain.stderr and "pin" not in plain.stderr, plain.stderr
    doc = json.loads(run_cli("plan", "-m", MINILM, "--cpu", "--prefer", "speed", "--json", env=env).stdout)
    assert doc["chosen"]["quant"] == "F16" and doc["pin"]["quant"] == "F16" and "pinned" in doc["reason"]
    assert doc["file"] == str(home / f"{MINILM}-F16.gguf")

    # --quant moves the pin, saying so once; every later run follows it, --auto-quant too, with nothing to say.
    moved = run_cli("embed", "-m", MINILM, "--quant", "Q6_K", "hi", env=env)
    assert f"pin moved from F16 ({MINILM}-F16.gguf) to Q6_K ({MINILM}-Q6_K.gguf)" in moved.stderr
    assert pin_in(home) == "Q6_K"
    again = run_cli("embed", "-m", MINILM, "--auto-quant", "--cpu", "--prefer", "speed", "hi", env=env)
    assert f"{MINILM}-Q6_K.gguf, Q6_K on cpu)" in again.stderr and "pin" not in again.stderr, again.stderr
    from runner import Embedder

    with Embedder(MINILM).pipeline as pipeline:
        assert pipeline.model.quant == "Q6_K"
    assert "on disk: F16 0.04 GiB, Q6_K 0.02 GiB; pinned Q6_K" in run_cli("models", env=env).stdout

    # A GGUF file is its own pin: running one leaves the directory's pin alone.
    as_file = run_cli("embed", "-m", str(home / f"{MINILM}-F16.gguf"), "hi", env=env)
    assert f"{MINILM}-F16.gguf, F16)" in as_file.stderr and pin_in(home) == "Q6_K"

    # Removing the pinned file drops the pin: the next run pins anew, and says so.
    run_cli("rm", MINILM, "--quant", "Q6_K", env=env)
    assert pin_in(home) is None
    anew = run_cli("embed", "-m", MINILM, "hi", env=env)
    assert f"pinned F16 ({MINILM}-F16.gguf): runs of this model use it" in anew.stderr


@pytest.mark.parametrize(
    "bad",
    [
        "Q6_K",  # not a table
        {"quant": "Q9", "file": "m-Q9.gguf", "sha256": None},  # no such quant
        {"quant": "F16", "file": "../../m-F16.gguf", "sha256": None},  # not a plain file name
        {"quant": "F16", "file": "m-F16.gguf", "sha256": 7},
    ],
)
def test_a_pin_that_is_not_one_is_ignored_with_a_warning(tmp_path, caplog, bad) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {}, "pin": bad}))
    with caplog.at_level("WARNING", logger="runner"):
        assert manifest.pinned(tmp_path) is None
    assert "is not a pin" in caplog.text


def test_the_pin_is_kept_by_records_and_dropped_with_its_file(tmp_path) -> None:
    manifest.pin(tmp_path, "Q8_0", "m-Q8_0.gguf", "ab" * 32)  # a directory without a manifest gets one
    assert manifest.pinned(tmp_path) == {"quant": "Q8_0", "file": "m-Q8_0.gguf", "sha256": "ab" * 32}
    table = json.loads((tmp_path / "manifest.json").read_text())
    table["files"] = {"m-F16.gguf": {"quant": "F16"}, "m-Q8_0.gguf": {"quant": "Q8_0"}}
    (tmp_path / "manifest.json").write_text(json.dumps(table))
    manifest.forget(tmp_path, ["m-F16.gguf"])
    assert manifest.pinned(tmp_path)["quant"] == "Q8_0"
    manifest.forget(tmp_path, ["m-Q8_0.gguf"])
    assert not (tmp_path / "manifest.json").exists()


def test_auto_quant_on_a_pin_the_planner_cannot_size_is_one_line(monkeypatch) -> None:
    """A model pinned to F32 (or an i-quant): --auto-quant cannot plan that type, and says how to go on."""
    from quantize.errors import BadInput
    from runner import model

    monkeypatch.setattr(model, "pin_of", lambda ref: {"quant": "F32", "file": "m-F32.gguf", "sha256": None})
    with pytest.raises(BadInput, match=r"^all-minilm-l6-v2: pinned to F32 \(m-F32.gguf\), a type the planner does "
                       r"not size; run without --auto-quant to use it, or --quant F16 to move the pin"):  # fmt: skip
        model.plan_run(MINILM, hardware=HardwareOptions(cpu=True, ram="16GiB"))
    shown = model.plan_run(MINILM, hardware=HardwareOptions(cpu=True, ram="16GiB"), for_run=False)  # runner plan
    assert "runs use the pinned F32 (m-F32.gguf), a type the planner does not size: --quant F16 moves the pin" in (
        shown.reason
    ), shown.reason
