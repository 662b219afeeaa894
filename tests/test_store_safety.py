"""The model store deletes only what it made (issue 20, items 1-3), and writes files atomically (one helper).

The rule: `runner rm`, `runner models --prune` and `--no-keep-f16` delete only files a model folder's own
manifest.json records, by a plain name, in a real folder directly inside the models home, never through a link
(plus the store's own temp files of writers that are gone); `runner verify` reads only plain names beside the
manifest. Every test here failed on the tree before the fix (see each docstring) except those marked as guards.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from quantize import files
from tests.conftest import run_cli
from tests.test_errors import assert_one_line_error

HOST = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())  # as temp names carry it


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def model_folder(directory: Path, names: dict[str, str], record: bool = True) -> Path:
    """DIRECTORY holding stand-in GGUF files NAMES ({file name: quant}), recorded in its manifest.json."""
    directory.mkdir(parents=True, exist_ok=True)
    table = {}
    for name, quant in names.items():
        (directory / name).write_bytes(b"GGUF stand-in " + name.encode())
        table[name] = {"quant": quant, "bytes": (directory / name).stat().st_size, "sha256": "0" * 64}
    if record:
        (directory / "manifest.json").write_text(json.dumps({"files": table}))
    return directory


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def runner(home: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"EMBEDRUNNER_HOME": str(home)}, check=False)


# --- 20.1 rm only inside the home ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["../victim", "absolute", "absolute-with-manifest"])
def test_rm_refuses_a_folder_outside_the_home(home, tmp_path, how) -> None:
    """Before: the name was joined onto the home, so `..` climbed out and an absolute path replaced it; the
    manifest check ran only when the joined path was not a directory: every *.gguf of the victim went."""
    victim = model_folder(tmp_path / "victim", {"mine-F16.gguf": "F16"}, record=how != "absolute")
    model = "../victim" if how == "../victim" else str(victim)
    proc = runner(home, "rm", model)
    assert_one_line_error(proc, model, "not a model folder in the models home")
    assert (victim / "mine-F16.gguf").exists()


def test_rm_dot_never_sweeps_the_home(home) -> None:
    """Before: `runner rm .` removed the *.gguf files lying in the models home itself."""
    (home / "loose.gguf").write_bytes(b"GGUF someone's file")
    assert_one_line_error(runner(home, "rm", "."), "not a model folder in the models home")
    assert (home / "loose.gguf").exists()


def test_rm_takes_a_path_to_a_folder_in_the_home(home) -> None:
    """Guard: a path that names a folder directly in the home is that model (`runner rm ~/.cache/embedrunner/x`)."""
    folder = model_folder(home / "m", {"m-F16.gguf": "F16"})
    proc = runner(home, "rm", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert not folder.exists()


def test_rm_removes_only_what_the_manifest_records(home) -> None:
    """Before: every *.gguf in the folder went, recorded or not, and live writers' temp files with them."""
    folder = model_folder(home / "m", {"m-F16.gguf": "F16", "m-Q8_0.gguf": "Q8_0"})
    (folder / "notes.gguf").write_bytes(b"the user's own file")
    live = folder / f".m-Q4_K_M.gguf.partial-{HOST}-{os.getpid()}-{'1' * 16}"  # a writer still running
    live.write_bytes(b"being written")
    dead = folder / f".m-Q6_K.gguf.partial-{HOST}-{dead_pid()}-{'0' * 16}"
    dead.write_bytes(b"a killed writer's")
    proc = runner(home, "rm", "m")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(["notes.gguf", live.name]), proc.stderr
    assert "kept" in proc.stderr and "notes.gguf" in proc.stderr and "not recorded" in proc.stderr


# --- 20.2 a model folder that is a link ---------------------------------------------------------------------
def test_rm_and_prune_never_delete_through_a_linked_model_folder(home, tmp_path) -> None:
    """Before: `runner rm NAME` and `runner models --prune` deleted in the folder the link points to."""
    elsewhere = model_folder(tmp_path / "elsewhere", {"x-F16.gguf": "F16", "x.head.gguf": "head"})
    partial = elsewhere / f".x-Q8_0.gguf.partial-{dead_pid()}"
    partial.write_bytes(b"half")
    (home / "x").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())

    assert_one_line_error(runner(home, "rm", "x"), str(home / "x"), "a link to", "never deletes through a link")
    pruned = runner(home, "models", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "skipped, a link" in pruned.stderr and "pruned 0 file(s)" in pruned.stdout
    assert sorted(p.name for p in elsewhere.iterdir()) == before and (home / "x").is_symlink()


# --- 20.3 manifests that are not what they seem ----------------------------------------------------------
def test_verify_reads_only_plain_names_beside_the_manifest(home, tmp_path) -> None:
    """Before: an entry `../secret.gguf` was followed, hashed and reported ok."""
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"not the store's")
    folder = model_folder(home / "m", {"m-F16.gguf": "F16"})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../secret.gguf"] = {"quant": "F16", "bytes": 15, "sha256": files.sha256(secret)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    proc = runner(home, "verify", "m")
    assert proc.returncode == 1
    assert f"BAD  {folder}: manifest.json records '../../secret.gguf', not a plain file name" in proc.stdout
    assert "secret" not in proc.stdout.replace("'../../secret.gguf'", "")


def test_verify_reports_a_linked_file_without_reading_it(home, tmp_path) -> None:
    folder = model_folder(home / "m", {"m-F16.gguf": "F16"})
    (folder / "m-F16.gguf").unlink()
    (folder / "m-F16.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    proc = runner(home, "verify", "m")
    assert proc.returncode == 1 and "not a regular file" in proc.stdout, proc.stdout


def test_rm_quant_with_a_list_manifest_removes_nothing(home) -> None:
    """Before: `[]` as manifest.json: the file was deleted, then forget() crashed (exit 2)."""
    folder = model_folder(home / "m", {"m-F16.gguf": "F16", "m-Q8_0.gguf": "Q8_0"})
    (folder / "manifest.json").write_text("[]")
    assert_one_line_error(runner(home, "rm", "m", "--quant", "Q8_0"), "manifest.json", "not a manifest")
    assert (folder / "m-Q8_0.gguf").exists()


@pytest.mark.parametrize("corrupt", ["[]", "{not json", '{"files": 3}'])
def test_one_corrupt_manifest_does_not_stop_prune(home, corrupt) -> None:
    """Before: one corrupt manifest stopped `runner models --prune` with a traceback (exit 2)."""
    broken = model_folder(home / "a", {"a-F16.gguf": "F16"})
    (broken / "manifest.json").write_text(corrupt)
    fine = model_folder(home / "b", {"b-F16.gguf": "F16", "b-Q8_0.gguf": "Q8_0"})
    (fine / "b-Q8_0.gguf").unlink()  # gone: its entry is pruned
    proc = runner(home, "models", "--prune")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {broken / 'manifest.json'}: not a manifest" in proc.stderr and "skipped" in proc.stderr
    assert list(json.loads((fine / "manifest.json").read_text())["files"]) == ["b-F16.gguf"]
    assert (broken / "a-F16.gguf").exists()


def test_a_dangling_link_does_not_stop_rm(home, tmp_path) -> None:
    """Before: the link's stat() failed and rm stopped with nothing removed (exit 2)."""
    folder = model_folder(home / "m", {"m-F16.gguf": "F16", "m-Q8_0.gguf": "Q8_0"})
    (folder / "m-Q8_0.gguf").unlink()
    (folder / "m-Q8_0.gguf").symlink_to(tmp_path / "gone.gguf")  # recorded, now a dangling link
    (folder / "a-Q4_K_M.gguf").symlink_to(tmp_path / "gone-too.gguf")  # not recorded
    proc = runner(home, "rm", "m")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in folder.iterdir()] == ["a-Q4_K_M.gguf"] and "kept a-Q4_K_M.gguf" in proc.stderr


def test_rm_quant_keeps_the_rest_and_the_manifest_in_step(home) -> None:
    """Guard: --quant removes the quant named and its manifest entry, nothing else."""
    folder = model_folder(home / "m", {"m-F16.gguf": "F16", "m-Q8_0.gguf": "Q8_0"})
    proc = runner(home, "rm", "m", "--quant", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == [".manifest.json.lock", "m-F16.gguf", "manifest.json"]
    assert list(json.loads((folder / "manifest.json").read_text())["files"]) == ["m-F16.gguf"]
    assert_one_line_error(runner(home, "rm", "m", "--quant", "Q8_0"), "no Q8_0 file here (have F16)")


# --- issue 19: one atomic write helper -------------------------------------------------------------------
def test_temp_names_are_unique_across_hosts_and_writers() -> None:
    """Before: `.<name>.partial-<PID>`: two hosts on a shared filesystem with the same PID wrote one temp file."""
    a, b = files.temp_name("v.npy"), files.temp_name("v.npy")
    assert a != b and a.startswith(f".v.npy.partial-{HOST}-{os.getpid()}-")


def test_only_this_hosts_dead_writers_temp_files_are_orphans(tmp_path) -> None:
    """Before: a temp file named by PID alone was removed when that PID was not running here, even when its
    writer ran on another host sharing the filesystem."""
    dead = dead_pid()
    other_host = tmp_path / f".v.npy.partial-otherhost-{dead}-{'a' * 16}"
    this_host = tmp_path / f".v.npy.partial-{HOST}-{dead}-{'b' * 16}"
    older_form = tmp_path / f".v.npy.partial-{dead}"
    live = tmp_path / files.temp_name("v.npy")
    for p in (other_host, this_host, older_form, live):
        p.write_bytes(b"x")
    with files.atomic_path(tmp_path / "v.npy") as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other_host.name, live.name, "v.npy"])


def test_atomic_path_fsyncs_the_file_then_the_directory_after_the_rename(tmp_path, monkeypatch) -> None:
    """Guard: the data is on disk before the name, and the name is on disk before the call returns."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or real_replace(a, b))
    files.write_text_atomic(tmp_path / "m.json", "{}")
    assert events == ["fsync file", "rename", "fsync dir"] and (tmp_path / "m.json").read_text() == "{}"
