"""CPU plans that know this CPU: the calibration cache, timing in turns that refuses a busy machine's numbers, and
--prefer fidelity|balanced|speed decisions."""

from __future__ import annotations

import functools
import json

import pytest
from click.testing import CliRunner

from planner import HardwareOptions, plan_for
from planner.calibration import CALIBRATED_LAYERS, Calibration, cpu_identity, layer_shape, load, save
from planner.hardware import Gpu, Hardware, probe, with_overrides
from planner.policy import plan
from planner.shapes import resolve_shape
from quantize.errors import BadInput
from tests.conftest import run_cli

GIB = 2**30
# Tokens/s over 32 layers on three kinds of CPU, as a calibration would predict them.
F16_FASTEST = {"F16": 4.7, "Q8_0": 2.8, "Q6_K": 4.0, "Q5_K_M": 3.4, "Q5_K_S": 3.5, "Q4_K_M": 3.1}  # our AVX2 EPYC
Q6K_FASTEST = {"F16": 6.8, "Q8_0": 7.6, "Q6_K": 12.9, "Q5_K_M": 11.0, "Q5_K_S": 11.2, "Q4_K_M": 10.3}  # another
Q4K_FASTEST = {"F16": 3.0, "Q8_0": 4.0, "Q6_K": 4.4, "Q5_K_M": 6.0, "Q5_K_S": 6.1, "Q4_K_M": 9.0}  # repacked Q4_K
# Mean cosine to F16 as `runner retention` could have measured it on the model (SmolLM2-135M's figures).
MEASURED = {"Q8_0": 0.99943, "Q6_K": 0.99911, "Q5_K_M": 0.99802, "Q4_K_M": 0.99092, "Q3_K_M": 0.98010, "Q2_K": 0.92977}


def cpu_machine(ram: float, vram: tuple[float, ...] = ()) -> Hardware:
    gpus = tuple(Gpu(i, "test", int(v * GIB), int(v * GIB)) for i, v in enumerate(vram))
    return with_overrides(Hardware(gpus, int(ram * GIB), int(ram * GIB), 8, True, "test"), reserve=GIB)


@pytest.mark.parametrize(
    "speeds,ram,prefer,quant",
    [
        (F16_FASTEST, 32, "balanced", "F16"),
        (F16_FASTEST, 32, "speed", "F16"),
        (F16_FASTEST, 16, "balanced", "Q6_K"),  # F16 does not fit: the faster of Q8_0 and Q6_K
        (Q6K_FASTEST, 32, "balanced", "Q6_K"),
        (Q6K_FASTEST, 32, "speed", "Q6_K"),
        (Q6K_FASTEST, 32, "fidelity", "F16"),
        (Q4K_FASTEST, 32, "balanced", "Q6_K"),  # Q4_K_M is faster but below 0.999 cosine
        (Q4K_FASTEST, 32, "speed", "Q4_K_M"),
        (Q4K_FASTEST, 10, "speed", "Q4_K_M"),
        (Q4K_FASTEST, 10, "balanced", "Q5_K_M"),  # nothing at >= 0.999 fits: the most faithful that does
        (Q4K_FASTEST, 8, "speed", "Q3_K_S"),  # nothing at Q4_K_M or above fits: the most faithful that does
        (None, 32, "balanced", "F16"),  # no calibration: fidelity decides
        (None, 32, "speed", "F16"),
    ],
)
def test_cpu_decisions_follow_this_cpus_speeds(speeds, ram, prefer, quant) -> None:
    shape = resolve_shape("llama-embed-nemotron-8b")
    p = plan(shape, cpu_machine(ram), 4096, prefer=prefer, cpu_speeds=speeds, retention=MEASURED)
    assert (p.chosen.quant, p.device) == (quant, "cpu"), p.summary()
    assert p.chosen.needs.ram <= p.hardware.ram_free
    if speeds is None and prefer != "fidelity":
        assert "runner calibrate" in p.reason
    if speeds and p.chosen.quant in speeds:
        assert p.chosen.cpu_tokens_per_s == speeds[p.chosen.quant]


def test_balanced_trusts_only_measured_retention() -> None:
    """Q6_K is the fastest on this CPU: balanced takes it once the model's own Q6_K is measured, not before."""
    shape, hw = resolve_shape("llama-embed-nemotron-8b"), cpu_machine(32)
    unmeasured = plan(shape, hw, 4096, cpu_speeds=Q6K_FASTEST)
    assert unmeasured.chosen.quant == "F16" and "faster but unmeasured" in unmeasured.reason
    assert plan(shape, hw, 4096, cpu_speeds=Q6K_FASTEST, retention={"Q6_K": 0.9995}).chosen.quant == "Q6_K"
    assert plan(shape, cpu_machine(16), 4096, cpu_speeds=Q6K_FASTEST).chosen.quant == "Q8_0"  # F16 does not fit


def test_gpu_plans_ignore_the_preference() -> None:
    shape = resolve_shape("llama-embed-nemotron-8b")
    for prefer in ("fidelity", "balanced", "speed"):
        p = plan(shape, cpu_machine(32, vram=(24,)), 4096, prefer=prefer, cpu_speeds=Q4K_FASTEST)
        assert (p.chosen.quant, p.device) == ("F16", "gpu")
    with pytest.raises(BadInput, match="--prefer fast"):
        plan(shape, cpu_machine(32), 4096, prefer="fast")


def test_plan_for_reads_the_cache_and_scales_by_layers(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(tmp_path))
    shape = resolve_shape("llama-embed-nemotron-8b")
    two_layers = {q: v * shape.layers / CALIBRATED_LAYERS for q, v in Q6K_FASTEST.items()}
    save(Calibration(cpu_identity(8), layer_shape(shape), CALIBRATED_LAYERS, two_layers))
    assert load(shape, threads=4) is None  # another thread count is another calibration
    fast = HardwareOptions(ram="32GiB", cpu=True, prefer="speed")
    p = plan_for("llama-embed-nemotron-8b", options=fast, hardware=cpu_machine(64))
    assert p.chosen.quant == "Q6_K" and p.chosen.cpu_tokens_per_s == pytest.approx(12.9)
    rows = {r["quant"]: r for r in p.as_json()["quants"]}
    assert rows["Q8_0"]["cpu_tokens_per_s"] == pytest.approx(7.6) and rows["Q2_K"]["cpu_tokens_per_s"] is None
    assert rows["F16"]["expected_cosine_to_f16"] == 1.0 and rows["Q6_K"]["expected_cosine_to_f16"] is None
    # NV-Embed-v2's trunk has the same layer: the same calibration serves it.
    assert plan_for("nv-embed-v2", options=fast, hardware=cpu_machine(64)).chosen.quant == "Q6_K"


def test_calibrate_command_measures_and_plan_shows_it(tmp_path) -> None:
    """The real benchmark on a small layer shape (MiniLM's), into a private models home."""
    env = {"EMBEDRUNNER_HOME": str(tmp_path)}
    before = run_cli("plan", "-m", "all-minilm-l6-v2", "--cpu", env=env).stdout
    assert "not measured on this machine" in before
    # --force: a shared test machine may be too busy for the repeats to agree (test_a_busy_machine... covers that)
    # IQ4_XS needs an importance matrix to be made: the calibration's random weights get a uniform one.
    args = ("calibrate", "-m", "all-minilm-l6-v2", "--quants", "F16,Q8_0,IQ4_XS", "--repeats", "2", "--force")
    out = run_cli(*args, env=env).stdout
    assert "F16" in out and "IQ4_XS" in out and str(tmp_path / "calibration.json") in out
    entries = json.loads((tmp_path / "calibration.json").read_text())
    (entry,) = entries.values()
    timed = {"F16", "Q8_0", "IQ4_XS"}
    assert set(entry["tokens_per_s"]) == timed and all(v > 0 for v in entry["tokens_per_s"].values())
    assert set(entry["spread"]) == timed and entry["load_average"] >= 0 and entry["measured_at"]
    doc = json.loads(run_cli("plan", "-m", "all-minilm-l6-v2", "--cpu", "--json", env=env).stdout)
    speeds = {r["quant"]: r["cpu_tokens_per_s"] for r in doc["quants"]}
    assert speeds["F16"] > 0 and speeds["Q8_0"] > 0 and speeds["Q6_K"] is None
    assert doc["chosen"]["quant"] in ("F16", "Q8_0") and doc["prefer"] == "balanced"
    bad = run_cli("calibrate", "-m", "all-minilm-l6-v2", "--quants", "Q9", env=env, check=False)
    assert bad.returncode == 1 and "--quants Q9: unknown quant" in bad.stderr


# A cache file anyone can edit, as JSON text: (what is changed, the raw JSON written in its place).
HOSTILE = [
    ("layers", '"abc"'),
    ("layers", "null"),
    ("layers", "1e400"),  # inf to Python's reader
    ("layers", "-2"),  # planned -300 tokens/s
    ("layers", "0"),
    ("layers", "true"),
    ("layers", "2.5"),
    ("F16", "1e999"),  # planned "inf tokens/s predicted" and chosen
    ("F16", "-300"),
    ("F16", "0"),
    ("F16", "NaN"),
    ("F16", '"fast"'),
    ("F16", "1e300"),
    ("Q9", "5"),
    ("tokens_per_s", "[]"),
    ("entry", '"x"'),
    ("spread", '"x"'),
    ("spread", '{"F16": -1}'),
    ("spread", '{"Q9": 0.1}'),
    ("measured_at", '"yesterday"'),
    ("measured_at", '"2025-12-06T08:30:00"'),  # no offset: which time zone?
    ("measured_at", "5"),
    ("load_average", '"high"'),
    ("load_average", "-1"),
    ("load_average", "1e400"),
]


def hostile_cache(home, shape, threads: int, field: str, raw: str) -> None:
    """A good calibration for SHAPE at THREADS in HOME, then FIELD of its entry replaced by the JSON text RAW."""
    good = Calibration(cpu_identity(threads), layer_shape(shape), CALIBRATED_LAYERS, dict(Q6K_FASTEST))
    path = save(good, home / "calibration.json")
    entries = json.loads(path.read_text())
    (key,) = entries
    if field == "entry":
        entries[key] = "@"
    elif field in ("layers", "tokens_per_s", "spread", "measured_at", "load_average"):
        entries[key][field] = "@"
    else:
        entries[key]["tokens_per_s"][field] = "@"
    path.write_text(json.dumps(entries).replace('"@"', raw))


@pytest.mark.parametrize("field,raw", HOSTILE)
def test_a_hostile_calibration_is_ignored_with_one_warning(tmp_path, monkeypatch, caplog, field, raw) -> None:
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(tmp_path))
    shape = resolve_shape("llama-embed-nemotron-8b")
    hostile_cache(tmp_path, shape, 8, field, raw)
    with caplog.at_level("WARNING", logger="runner"):
        assert load(shape, threads=8) is None
    (warning,) = caplog.records
    assert str(tmp_path / "calibration.json") in warning.getMessage() and "ignored" in warning.getMessage()
    p = plan_for("llama-embed-nemotron-8b", options=HardwareOptions(ram="32GiB", cpu=True), hardware=cpu_machine(64))
    assert p.chosen.quant == "F16" and "runner calibrate" in p.reason, p.summary()  # no calibration: fidelity
    assert all(r.cpu_tokens_per_s is None for r in p.rows)


def test_a_hostile_calibration_through_the_cli(tmp_path) -> None:
    """`runner plan` on a cache whose layers are "abc" (exit 2 before) and one claiming 1e999 tokens/s."""
    shape = resolve_shape("llama-embed-nemotron-8b")
    for field, raw in (("layers", '"abc"'), ("F16", "1e999")):
        hostile_cache(tmp_path, shape, probe().cores, field, raw)
        args = ("plan", "-m", "llama-embed-nemotron-8b", "--cpu", "--ram", "32GiB")
        proc = run_cli(*args, env={"EMBEDRUNNER_HOME": str(tmp_path)})
        warnings = proc.stderr.strip().splitlines()
        assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "calibration.json" in warnings[0]
        assert "not measured on this machine" in proc.stdout and "inf" not in proc.stdout, proc.stdout


def test_a_cache_that_is_not_a_table_is_ignored_and_replaced(tmp_path) -> None:
    shape = resolve_shape("llama-embed-nemotron-8b")
    path = tmp_path / "calibration.json"
    for text in ("{not json", "[1, 2]", "[" * 100_000):
        path.write_text(text)
        assert load(shape, threads=8, path=path) is None
        good = Calibration(cpu_identity(8), layer_shape(shape), CALIBRATED_LAYERS, dict(Q6K_FASTEST))
        save(good, path)
        assert load(shape, threads=8, path=path) == good


def test_quants_are_timed_in_turns() -> None:
    """Round-robin: A B C, A B C (load that comes and goes falls on all alike); rates from the clock."""
    from runner.calibrate import in_turns, spread

    order, now = [], iter([0, 1, 1, 3, 3, 4, 4, 5, 5, 8, 8, 9])  # start, end of each run
    runs = {q: functools.partial(lambda q: order.append(q) or 100, q) for q in ("F16", "Q8_0", "Q6_K")}
    rates = in_turns(runs, 2, clock=lambda: next(now))
    assert order == ["F16", "Q8_0", "Q6_K"] * 2
    assert rates == {"F16": [100, 100], "Q8_0": [50, 100 / 3], "Q6_K": [100, 100]}
    assert spread(rates["Q8_0"]) == pytest.approx((50 - 100 / 3) / ((50 + 100 / 3) / 2))


def busy_clock(durations: dict[int, float]):
    """A clock whose Nth timed run (0-based) takes DURATIONS.get(N, 1.0) seconds: what a busy machine does."""
    state = {"now": 0.0, "calls": 0}

    def clock() -> float:
        run, end = divmod(state["calls"], 2)
        if end:
            state["now"] += durations.get(run, 1.0)
        state["calls"] += 1
        return state["now"]

    return clock


def test_a_busy_machines_calibration_is_shown_not_cached(tmp_path, monkeypatch) -> None:
    """The real benchmark with a fabricated timer: Q8_0's second repeat runs 2.5x slower (another process took the
    CPU): shown with its spread, refused in one line naming why and what to do; --force caches it anyway, and
    `runner plan` says when and under what load the calibration was taken."""
    import runner.calibrate
    from runner.cli import main

    monkeypatch.setenv("EMBEDRUNNER_HOME", str(tmp_path))
    real = runner.calibrate.calibrate
    args = ["calibrate", "-m", "all-minilm-l6-v2", "--quants", "F16,Q8_0", "--repeats", "3"]
    # Runs in turns: F16, Q8_0, F16, Q8_0, F16, Q8_0; run 3 is Q8_0's second.
    monkeypatch.setattr(runner.calibrate, "calibrate", functools.partial(real, clock=busy_clock({3: 2.5})))
    busy = CliRunner().invoke(main, args)
    assert busy.exit_code == 1 and not (tmp_path / "calibration.json").exists()
    assert "  Q8_0" in busy.stdout and "60%" in busy.stdout, busy.stdout
    (refusal,) = busy.stderr.splitlines()
    assert refusal.startswith("error: not cached: Q8_0's 3 repeats differ by 60% (more than 15%) under a load avera")
    assert "quieter moment" in refusal and "--force" in refusal
    monkeypatch.setattr(runner.calibrate, "calibrate", functools.partial(real, clock=busy_clock({3: 2.5})))
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0 and str(tmp_path / "calibration.json") in forced.stdout, forced.stderr
    shape = resolve_shape("all-minilm-l6-v2")
    saved = load(shape, probe().cores)
    assert saved.spread["Q8_0"] == pytest.approx(0.6) and saved.spread["F16"] == 0 and saved.load_average >= 0
    shown = run_cli("plan", "-m", "all-minilm-l6-v2", "--cpu", env={"EMBEDRUNNER_HOME": str(tmp_path)}).stdout
    (line,) = [x for x in shown.splitlines() if x.startswith("CPU tok/s: calibrated ")]
    assert saved.measured_at[:10] in line and "load average" in line and "repeats within 60%" in line

    steady = functools.partial(real, clock=busy_clock({3: 1.1}))
    monkeypatch.setattr(runner.calibrate, "calibrate", steady)
    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0 and load(shape, probe().cores).spread["Q8_0"] == pytest.approx(1 - 1 / 1.1), ok.stderr


def test_measured_fidelity_outranks_the_ladder_on_8_gib() -> None:
    """An 8 GiB GPU, or about 8 GiB of RAM free: the ladder's pick loses to a smaller quant made with an importance
    matrix that measured higher on this model, and a measured i-quant joins the candidates; unmeasured, the ladder
    rules and the i-quants are not candidates."""
    shape = resolve_shape("llama-embed-nemotron-8b")
    gpu, ram, tight = cpu_machine(64, vram=(8,)), cpu_machine(9.6), cpu_machine(8.5)
    assert plan(shape, gpu, 4096).chosen.quant == "Q5_K_M"
    assert plan(shape, ram, 4096, prefer="fidelity").chosen.quant == "Q5_K_S"
    assert plan(shape, tight, 4096, prefer="fidelity").chosen.quant == "Q3_K_L"
    measured = {"Q5_K_M": 0.9975, "Q5_K_S": 0.9974, "Q4_K_M": 0.9991, "Q4_K_S": 0.9982, "IQ4_XS": 0.9990,
                "Q3_K_L": 0.9930}  # fmt: skip
    on_gpu = plan(shape, gpu, 4096, retention=measured)
    assert (on_gpu.chosen.quant, on_gpu.device) == ("Q4_K_M", "gpu"), on_gpu.summary()
    assert "IQ4_XS" in [r.quant for r in on_gpu.rows] and "IQ3_M" not in [r.quant for r in on_gpu.rows]
    assert plan(shape, ram, 4096, prefer="fidelity", retention=measured).chosen.quant == "Q4_K_M"
    assert plan(shape, tight, 4096, prefer="fidelity", retention=measured).chosen.quant == "IQ4_XS"
