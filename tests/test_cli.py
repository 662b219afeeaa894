"""The CLI package: commands loaded when used, options built once from their dataclass, bad values in one line,
and `runner embed` a thin shell over runner.embed_run.run_embed."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest

from planner import HardwareOptions
from runner.distributed import embed_dataset
from runner.embed_run import EmbedOptions
from tests.conftest import run_cli
from tests.test_errors import assert_one_line_error


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(run_cli("convert", "all-minilm-l6-v2").stdout.strip())


def test_help_loads_no_server_ray_or_engine() -> None:
    """`runner --help` lists every command without importing FastAPI, Ray or llama.cpp."""
    probe = (
        "import sys\nfrom runner.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('\\n' + repr(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(eval(proc.stdout.splitlines()[-1]))
    assert "embed-dataset" in proc.stdout and "serve" in proc.stdout
    assert not loaded & {"fastapi", "starlette", "uvicorn", "ray", "llama_cpp", "torch"}, loaded


def test_every_command_loads() -> None:
    from runner.cli import COMMANDS, main

    ctx = click.Context(main)
    for name in COMMANDS:
        assert isinstance(main.get_command(ctx, name), click.Command), name
    assert main.get_command(ctx, "no-such-command") is None


def test_defaults_are_the_dataclasses() -> None:
    from runner.cli import main

    def defaults(command: str) -> dict:
        cmd = main.get_command(click.Context(main), command)
        return {p.name: p.default for p in cmd.params}

    embed, plan = defaults("embed"), defaults("plan")
    assert embed["chunk_size"] == EmbedOptions.chunk_size and embed["precision"] == EmbedOptions.precision
    assert embed["normalize"] is EmbedOptions.normalize and embed["query"] is EmbedOptions.query
    dataset = defaults("embed-dataset")
    for name, value in inspect.signature(embed_dataset).parameters.items():
        if name in dataset and value.default not in (None, inspect.Parameter.empty):
            assert dataset[name] == value.default, name
    for d in (embed, plan, dataset):
        assert d["reserve"] == HardwareOptions.reserve and d["prefer"] == HardwareOptions.prefer


@pytest.mark.parametrize(
    "args, needle",
    [
        (["embed", "-m", "all-minilm-l6-v2", "--chunk-size", "0", "hi"], "--chunk-size 0 is not in the range x>=1"),
        (["embed", "-m", "all-minilm-l6-v2", "--dimensions", "-5", "hi"], "--dimensions -5 is not in the range"),
        (["embed", "-m", "all-minilm-l6-v2", "--max-length", "0", "hi"], "--max-length 0 is not in the range"),
        (["plan", "-m", "all-minilm-l6-v2", "--prefer", "fast"], "--prefer 'fast' is not one of"),
        (["quantize", "x.gguf", "--threads", "0", "--quant", "Q8_0"], "--threads 0 is not in the range"),
    ],
)
def test_a_bad_option_value_is_one_line_naming_it(args, needle) -> None:
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1
    assert_one_line_error(proc, needle)


def test_run_embed_is_what_runner_embed_does(minilm, tmp_path) -> None:
    """The command parses and prints; run_embed does the work, so a library call writes the CLI's file."""
    from runner.embed_run import run_embed
    from runner.pipeline import open_pipeline

    texts = ["A man is eating food.", "A man is riding a horse.", "A woman is playing violin."]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    cli = run_cli("embed", "-m", str(minilm), "--input", str(tmp_path / "in.txt"), "-o", str(tmp_path / "cli.npy"))
    with open_pipeline(str(minilm)) as pipeline:
        run = run_embed(pipeline, iter(texts), str(tmp_path / "lib.npy"), options=EmbedOptions(chunk_size=2))
    assert run.counts.texts == 3 and run.counts.tokens > 3 and run.seconds > 0 and run.ranges_saved is None
    np.testing.assert_allclose(np.load(tmp_path / "lib.npy"), np.load(tmp_path / "cli.npy"), atol=1e-6)
    assert "embedded 3 texts, " in cli.stderr


def test_run_embed_to_stdout_as_json_lines(minilm, capsys) -> None:
    from runner.embed_run import run_embed
    from runner.pipeline import open_pipeline

    with open_pipeline(str(minilm)) as pipeline:
        run = run_embed(pipeline, ["hello"], options=EmbedOptions(dimensions=None, normalize=False))
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["id"] == 0 and len(row["embedding"]) == 384 and run.counts.texts == 1
