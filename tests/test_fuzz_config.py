"""A bounded, seeded config.json fuzz: each family's tiny config.json (tests/config_fuzz.py) mutated in types, signs,
sizes, shapes, missing keys and nesting, then planned. Each plan either works, for a model that makes sense (every
size positive, a max length of at least 1), or ends in one of the project's typed errors: one line naming the
checkpoint, never another exception (the CLI's exit 2), never a plan of a nonsense model.

All mutations go through planner.plan_for in this process (the same call `runner plan` makes), a quarter of them
on a machine with a GPU; a handful go through `runner plan` itself. FUZZ_SEED and FUZZ_COUNT reproduce or widen a
run: a failure prints its mutation.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from planner import Plan, plan_for
from planner.hardware import Gpu, Hardware
from quantize.errors import UserError
from quantize.gguf_check import MAX_LAYERS
from tests.config_fuzz import CONFIGS, mutations

SEED = int(os.environ.get("FUZZ_SEED", "20"))
COUNT = int(os.environ.get("FUZZ_COUNT", "300"))
GIB = 2**30
CPU = Hardware((), 64 * GIB, 64 * GIB, 8, False, "fuzz")
GPU = Hardware((Gpu(0, "fuzz", 8 * GIB, 8 * GIB),), 64 * GIB, 64 * GIB, 8, True, "fuzz")


def nonsense(p: Plan) -> str | None:
    """What makes an accepted plan a plan of no model, or None."""
    s = p.shape
    if not 1 <= s.layers <= MAX_LAYERS or min(s.hidden, s.ffn, s.heads, s.kv_heads, s.vocab, s.context) < 1:
        return f"shape {s.layers} layers, {s.hidden} wide, {s.heads}/{s.kv_heads} heads, vocab {s.vocab}"
    if not 1 <= p.settings.max_length <= s.context:
        return f"max length {p.settings.max_length} for a context of {s.context}"
    for r in p.rows:
        if r.needs.file <= 0 or r.needs.ram <= 0 or min(r.needs.gpu, default=0) < 0:
            return f"{r.quant}: {r.needs.file} bytes on disk, {r.needs.ram} in RAM, {r.needs.gpu} on GPUs"
    if p.chosen.fits == "no":
        return f"chose {p.chosen.quant}, which fits nowhere"
    return None


def outcome(ckpt, family: str, n: int, what: str, text: str) -> tuple[bool, str | None]:
    """(planned, problem) for one mutation written to CKPT/config.json."""
    (ckpt / "config.json").write_text(text)
    where = f"{family} mutation {what[:300]} (FUZZ_SEED={SEED})"
    try:
        p = plan_for(str(ckpt), hardware=GPU if n % 4 == 0 else CPU)
    except UserError as e:
        one_line = "\n" not in str(e) and "ckpt" in str(e)
        return False, None if one_line else f"{where}: not one line naming the checkpoint: {str(e)[:300]}"
    except Exception as e:  # anything else is what the fuzz looks for
        return False, f"{where}: {type(e).__name__}: {str(e)[:300]}"
    return True, None if (why := nonsense(p)) is None else f"{where}: {why}"


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_mutated_configs_plan_or_refuse_in_one_line(tmp_path, family) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    failures, planned = [], 0
    for n, (what, text) in enumerate(mutations(family, SEED, COUNT)):
        ok, problem = outcome(ckpt, family, n, what, text)
        planned += ok
        if problem:
            failures.append(problem)
    assert not failures, f"{len(failures)} of {COUNT} mutations failed:\n" + "\n".join(failures[:20])
    # Some mutations must get past the checks (a key nothing reads, a size still in range) and plan.
    assert planned > COUNT // 20, planned


def test_mutated_configs_through_the_cli(tmp_path) -> None:
    """The first refused and the first planned mutation of three families, through `runner plan` (in parallel):
    exit 0 with a plan, or exit 1 with one line naming the checkpoint; never exit 2."""
    picked = []
    for family in ("nemotron", "qwen3", "nvembed"):
        ckpt = tmp_path / family / "ckpt"
        ckpt.mkdir(parents=True)
        seen = set()
        for n, (what, text) in enumerate(mutations(family, SEED, COUNT)):
            ok, _ = outcome(ckpt, family, n, what, text)
            if ok not in seen:
                seen.add(ok)
                (ckpt.parent / f"m{n}" / "ckpt").mkdir(parents=True)
                (ckpt.parent / f"m{n}" / "ckpt" / "config.json").write_text(text)
                picked.append((f"{family} mutation {what[:200]}", ok, ckpt.parent / f"m{n}" / "ckpt"))
            if len(seen) == 2:
                break
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "runner", "plan", "-m", str(d), "--cpu", "--ram", "64GiB"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _, _, d in picked
    ]
    for (what, _, _), proc in zip(picked, runs, strict=True):
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        if proc.returncode == 0:
            assert "chosen:" in out and not err, f"{what}: {out[-1500:]} {err[-1500:]}"
        else:
            assert proc.returncode == 1 and len(lines) == 1, f"{what}: exit {proc.returncode}: {err[-1500:]}"
            assert lines[0].startswith("error: ") and "ckpt" in lines[0], lines[0]
    assert {planned for _, planned, _ in picked} == {True, False}
