"""One answer to "what is -m?": quantize.reference.ModelRef, read alike by the planner, the disk plan, resolution and
every front door, which all check the disk before the first byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from planner import HardwareOptions, disk, plan_for
from quantize.errors import ModelNotFound
from quantize.reference import Kind, ModelRef
from tests.conftest import run_cli

GIB = 2**30
NEMOTRON = "llama-embed-nemotron-8b"
CPU_16G = ["--cpu", "--ram", "16GiB"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(run_cli("convert", "all-minilm-l6-v2").stdout.strip())


def test_what_each_kind_of_model_is(minilm, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(minilm, tmp_path / "x.gguf")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert ModelRef.parse("~/x.gguf") == ModelRef("~/x.gguf", Kind.GGUF, tmp_path / "x.gguf")
    assert ModelRef.parse(str(minilm.parent)).kind is Kind.STORE
    assert ModelRef.parse("~/ckpt") == ModelRef("~/ckpt", Kind.CHECKPOINT, tmp_path / "ckpt")
    ref = ModelRef.parse("all-minilm-l6-v2")
    assert ref.kind is Kind.REGISTRY and ref.entry.name == "all-minilm-l6-v2" and ref.home == minilm.parent
    hub = ModelRef.parse("someone/some-embedder")
    assert hub.kind is Kind.HUB and hub.repo == "someone/some-embedder" and hub.path is None
    assert ModelRef.parse(ref) is ref


def test_a_converted_checkpoint_is_found_by_its_name_in_the_models_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(tmp_path))
    (tmp_path / "my-ckpt").mkdir()
    assert ModelRef.parse("my-ckpt") == ModelRef("my-ckpt", Kind.STORE, tmp_path / "my-ckpt")


@pytest.mark.parametrize("model", ["~/missing.gguf", "./missing", "/no/such/dir", "models/x.gguf", "a/b/c"])
def test_a_missing_path_is_named_and_never_looked_up_in_the_registry(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EMBEDRUNNER_MODELS", str(tmp_path / "no-registry.toml"))  # a lookup would fail otherwise
    with pytest.raises(ModelNotFound) as e:
        ModelRef.parse(model)
    assert str(e.value).startswith(f"{model}: no such file or directory")


def test_an_unknown_name_lists_the_registry() -> None:
    with pytest.raises(ModelNotFound, match=r"^nope: no such file, directory or registry name \(known: .*all-minilm"):
        ModelRef.parse("nope")


def test_embedder_on_a_home_relative_gguf_plans_that_file_as_runner_embed_does(minilm, tmp_path, monkeypatch) -> None:
    """`~` is expanded once, so quant="auto" plans the one file there (no ladder) and loads it, as the CLI does."""
    from runner import Embedder

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(minilm, tmp_path / "x.gguf")
    with Embedder("~/x.gguf", quant="auto", hardware=HardwareOptions(cpu=True, ram="16GiB")) as model:
        assert model.pipeline.model.path == tmp_path / "x.gguf"
        assert model.plan.chosen.quant == "F16" and model.plan.reason == "F16 was asked for"  # the file's own
        assert model.plan.disk.needs == 0
        vector = model.encode(["hello"])[0]
    cli = run_cli("embed", "-m", "~/x.gguf", "--auto-quant", *CPU_16G, "hello", env={"HOME": str(tmp_path)})
    assert cli.stderr.splitlines()[0] == model.plan.summary()
    np.testing.assert_allclose(json.loads(cli.stdout.splitlines()[0])["embedding"], vector, atol=1e-6)


@pytest.fixture
def small_disk(tmp_path, monkeypatch) -> Path:
    """An 8B first run against a 1 GiB disk, offline (as tests/test_first_run.py): returns the models home."""
    home = tmp_path / "home"
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(home))
    monkeypatch.setattr(disk, "hub_cache", lambda: tmp_path / "hub")
    monkeypatch.setattr(disk, "hub_listing", lambda repo, revision: None)
    monkeypatch.setattr(disk, "volume", lambda path: (1, GIB))
    return home


def test_embed_dataset_refuses_a_model_the_disk_cannot_hold_as_embed_does(small_disk, tmp_path) -> None:
    """Resolution runs the disk check, so embed-dataset (which resolves on the driver) refuses before the first
    byte with runner embed's very line."""
    from runner.cli import main

    pytest.importorskip("ray")
    (tmp_path / "in.txt").write_text("hello\n")
    cli = CliRunner()
    embed = cli.invoke(main, ["embed", "-m", NEMOTRON, "--auto-quant", *CPU_16G, "hello"])
    dataset = cli.invoke(main, ["embed-dataset", str(tmp_path / "in.txt"), str(tmp_path / "out"), "-m", NEMOTRON,
                                *CPU_16G])  # fmt: skip
    assert embed.exit_code == dataset.exit_code == 1
    refused = embed.stderr.splitlines()[-1]  # after the plan line
    assert refused.startswith(f"error: {NEMOTRON}: needs ") and "1.00 GiB free" in refused
    assert dataset.stderr.splitlines()[-1] == refused
    assert not small_disk.exists() and not (tmp_path / "hub").exists()


def test_resolution_itself_checks_the_disk(small_disk) -> None:
    """No front door can skip the check: resolve_model refuses before it downloads or converts anything."""
    from quantize.errors import NotEnoughDisk
    from runner.model import resolve_model

    with pytest.raises(NotEnoughDisk, match="1.00 GiB free"):
        resolve_model(NEMOTRON, "Q4_K_M")
    assert not small_disk.exists()


def test_plan_for_reads_a_gguf_file_through_the_same_reference(minilm) -> None:
    plan = plan_for(str(minilm), options=HardwareOptions(cpu=True, ram="16GiB"))
    assert plan.chosen.quant == "F16" and plan.reason == "F16 was asked for" and plan.disk.needs == 0


def test_a_hub_repo_id_that_cannot_be_had_is_one_line(tmp_path) -> None:
    from tests.test_errors import assert_one_line_error

    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "EMBEDRUNNER_HOME": str(tmp_path / "home")}
    for command in (["plan", "-m", "someone/some-embedder", "--cpu"], ["embed", "-m", "someone/some-embedder", "hi"]):
        proc = run_cli(*command, env=env, check=False)
        assert proc.returncode == 1
        assert_one_line_error(proc, "someone/some-embedder: no config.json from the hub nor the Hugging Face cache")
    assert not (tmp_path / "home").exists()


def test_a_hub_repo_id_runs_from_the_hugging_face_cache(minilm, tmp_path) -> None:
    """-m owner/name plans (nothing to download: it is cached), converts once into the models home and embeds
    as the same weights do under their registry name."""
    from quantize.source import package_dir, source_files

    snapshot = package_dir(ModelRef.parse("all-minilm-l6-v2").entry.package)
    repo = tmp_path / "hf" / "hub" / "models--someone--minilm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for f in source_files(snapshot):
        (repo / "snapshots" / commit / f.relative_to(snapshot)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, repo / "snapshots" / commit / f.relative_to(snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "EMBEDRUNNER_HOME": str(tmp_path / "home")}

    plan = json.loads(run_cli("plan", "-m", "someone/minilm", *CPU_16G, "--json", env=env).stdout)["disk"]
    assert plan["download_from"] == "Hugging Face cache" and plan["items"][0]["needs_bytes"] == 0
    assert plan["items"][1]["path"] == str(tmp_path / "home" / "minilm" / "minilm-F16.gguf")
    hub = run_cli("embed", "-m", "someone/minilm", "hello", env=env)
    assert (tmp_path / "home" / "minilm" / "minilm-F16.gguf").is_file() and "convert: minilm-F16.gguf" in hub.stderr
    direct = run_cli("embed", "-m", str(minilm), "hello")
    np.testing.assert_allclose(json.loads(hub.stdout)["embedding"], json.loads(direct.stdout)["embedding"], atol=1e-6)
