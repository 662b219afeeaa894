"""bench.cpu_peers without running a model: its options, the CPU flags it reads, its texts and its table."""

from __future__ import annotations

import numpy as np
import pytest

from bench import cpu_peers

# What planner.calibration.cpu_identity records of a Sapphire Rapids CPU (its ISA_FLAGS that the CPU has).
SAPPHIRE_RAPIDS = ["avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]


def test_defaults_fit_the_brief(monkeypatch) -> None:
    flags = cpu_peers.cpu_flags
    monkeypatch.setattr(cpu_peers, "cpu_flags", lambda: flags(["avx2"]))
    args = cpu_peers.parse_args([])
    assert args.models == ["minilm", "smollm2", "llama8b"]
    assert args.quants == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
    assert (args.rounds, args.short, args.passages, args.packed) == (3, 32, 8, False)
    # Ours in BF16 by default only where the CPU has BF16 units; --quants BF16 anywhere.
    monkeypatch.setattr(cpu_peers, "cpu_flags", lambda: flags(SAPPHIRE_RAPIDS))
    assert cpu_peers.parse_args([]).quants == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "BF16"]
    assert cpu_peers.parse_args(["--quants", "f16,bf16"]).quants == ["F16", "BF16"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "minilm,bert"], "unknown model bert in --models; choose from minilm, smollm2, llama8b"),
        (["--quants", "q8_0,Q9"], "unknown quant Q9 in --quants; choose from F16, "),
        (["--rounds", "0"], "--rounds must be at least 1"),
    ],
)
def test_bad_options_are_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cpu_peers.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_flags_and_bf16_units() -> None:
    flags = cpu_peers.cpu_flags(SAPPHIRE_RAPIDS)
    assert flags == {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx512_bf16": False, "amx": True}
    assert cpu_peers.has_bf16_units(flags)
    avx2_only = cpu_peers.cpu_flags(["avx", "avx2", "fma"])
    assert not any(v for f, v in avx2_only.items() if f != "avx2")
    assert not cpu_peers.has_bf16_units(avx2_only)


def test_text_sets() -> None:
    short = cpu_peers.short_texts(64)
    assert len(short) == len(set(short)) == 64
    assert all(10 <= len(t.split()) <= 60 for t in short)
    passages = cpu_peers.passages(16)
    assert len(passages) == len(set(passages)) == 16
    assert all(160 <= len(p.split()) <= 300 for p in passages)
    assert passages == cpu_peers.passages(16)  # deterministic


def test_table_rows() -> None:
    ref = np.eye(2, 4, dtype=np.float32)
    base = cpu_peers.System("torch fp32", lambda t: ref, seconds={"short": [2.0, 4.0, 3.0]}, vectors={"short": ref})
    near = ref + np.array([[0, 0.1, 0, 0], [0, 0, 0, 0]], np.float32)
    ours = cpu_peers.System("ours Q8_0", lambda t: near, seconds={"short": [1.0, 1.5, 9.0]}, vectors={"short": near})
    rows = cpu_peers.table_rows("m", "short", 300, [base, ours])
    assert rows == [
        "| m | short | torch fp32 | 100 | 1.00x | 1 / 1 |",
        "| m | short | ours Q8_0 | 200 | 2.00x | 0.99752 / 0.99504 |",
    ]


def test_engine_trials_are_extra_rows() -> None:
    assert cpu_peers.variants(cpu_peers.parse_args(["--threads", "2"])) == [("", 2, None)]
    args = cpu_peers.parse_args(["--threads", "2", "--packed", "--ours-threads", "1"])
    assert cpu_peers.variants(args) == [("", 2, None), (" packed", 2, True), (", 1 thread", 1, None)]
