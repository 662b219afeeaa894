"""A bounded, seeded GGUF fuzz: mutated headers and metadata of a small model through `runner embed` and
`runner plan`. Each run either works or ends with one line naming the file: never an abort (134), a bus
error (135) or a segfault (139), never a traceback, never a hang.

The runs go through the CLI entry point inside worker subprocesses (tests/gguf_fuzz.py), many per process
to stay fast: a crash kills the worker, is recorded against the mutation it was running, and a new worker
takes the rest. FUZZ_SEED and FUZZ_COUNT reproduce or widen a run: a failure prints its mutation number.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.gguf_edit import read, shrink_vocab
from tests.gguf_fuzz import MARK, TASK_TIMEOUT, mutations

SEED = int(os.environ.get("FUZZ_SEED", "14"))
COUNT = int(os.environ.get("FUZZ_COUNT", "320"))
CRASHES = {134: "abort", 135: "bus error", 136: "floating point exception", 139: "segfault"}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A llama-embed model made by our converter (Mistral trunk, 64 wide, 2 layers), its SPM vocabulary cut to
    512 tokens (the 256 byte tokens included): 230 KB, so hundreds of copies load in seconds."""
    from tests.synth import build_checkpoint

    root = tmp_path_factory.mktemp("fuzz")
    hf = build_checkpoint(
        root / "hf", tokenizer_dir("mistral"), "MistralModel", hidden=64, heads=2, kv_heads=1, ffn=128
    )
    f16 = Path(run_cli("convert", str(hf), "--outdir", str(root / "gguf")).stdout.strip())
    return shrink_vocab(f16, root / "small.gguf", 512)


def run_tasks(tasks: list[dict], workdir: Path) -> dict[str, dict]:
    """Each task's result; a worker that dies records the task it was running and a new one goes on."""
    results: dict[str, dict] = {}
    pending = tasks
    while pending:
        todo = workdir / "tasks.json"
        todo.write_text(json.dumps(pending))
        proc = subprocess.run(
            [sys.executable, "-m", "tests.gguf_fuzz", str(todo)],
            capture_output=True,
            text=True,
            timeout=TASK_TIMEOUT * 2 + 10 * len(pending),
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        running = None
        for line in proc.stdout.splitlines():
            if not line.startswith(MARK):
                continue
            msg = json.loads(line.removeprefix(MARK))
            if "start" in msg:
                running = msg["start"]
            else:
                results[msg["id"]] = msg
                running = None
        if proc.returncode != 0:
            assert running is not None, f"worker failed outside a task ({proc.returncode}): {proc.stderr[-2000:]}"
            rc = -proc.returncode if proc.returncode < 0 else proc.returncode
            hung = "Timeout (" in proc.stderr
            kind = "hang" if hung else CRASHES.get(128 + rc, f"crash (exit {proc.returncode})")
            results[running] = {"id": running, "rc": kind, "stdout": "", "stderr": proc.stderr[-3000:]}
        pending = [t for t in pending if t["id"] not in results]
    return results


def problem(result: dict, path: str, command: str) -> str | None:
    """What is wrong with one run, or None: it worked, or said what is wrong in one line naming the file."""
    rc, err = result["rc"], result["stderr"]
    if not isinstance(rc, int):
        return f"{rc}: {err[-1500:]}"
    if "Traceback" in err:
        return f"traceback: {err[-1500:]}"
    if rc == 0:
        if command == "embed":
            vector = json.loads(result["stdout"].splitlines()[0])["embedding"]
            if not all(math.isfinite(x) for x in vector):
                return "a non-finite vector and exit 0"
        return None
    lines = err.strip().splitlines()
    if rc != 1 or len(lines) != 1 or not lines[0].startswith("error: "):
        return f"exit {rc}, not one error line: {err[-1500:]}"
    if Path(path).name not in lines[0]:
        return f"the error does not name the file: {lines[0]}"
    return None


def test_mutated_ggufs_never_crash(small_model, tmp_path) -> None:
    base = read(small_model)
    tasks, described = [], {}
    for n, (what, data) in enumerate(mutations(base, SEED, COUNT)):
        path = tmp_path / f"m{n:04d}.gguf"
        path.write_bytes(data)
        described[str(n)] = (what, str(path))
        query = ["--query", "--task", "find {text}"] if n % 2 else []
        tasks.append({"id": f"{n}/embed", "args": ["embed", "-m", str(path), "hello wörld", "-q", *query]})
        tasks.append({"id": f"{n}/plan", "args": ["plan", "-m", str(path), "--cpu", "--ram", "8GiB"]})
    results = run_tasks(tasks, tmp_path)
    failures, worked = [], 0
    for task in tasks:
        n, command = task["id"].split("/")
        what, path = described[n]
        if (why := problem(results[task["id"]], path, command)) is not None:
            failures.append(f"runner {command} on mutation {what} (FUZZ_SEED={SEED}): {why}")
        worked += results[task["id"]]["rc"] == 0
    assert not failures, f"{len(failures)} of {len(tasks)} runs failed:\n" + "\n\n".join(failures[:20])
    # The mutations must not all be refused at the door: some must reach llama.cpp and work.
    assert worked > len(tasks) // 10, worked
