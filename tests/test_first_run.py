"""The first run of a model: the disk plan (download, F16, the chosen quant, what is cached), the refusal before
the first byte when the disk is too small, progress on a terminal only, and --no-keep-f16 / rm / prune."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from planner import HardwareOptions, disk, plan_for
from planner.hardware import Hardware
from planner.shapes import resolve_shape
from quantize.errors import NotEnoughDisk
from quantize.sizes import read_tensors
from quantize.source import HUB_PATTERNS
from tests.conftest import run_cli

GIB, MIB = 2**30, 2**20
CPU_16G = Hardware((), 16 * GIB, 16 * GIB, 2, False, "test")
NEMOTRON = "llama-embed-nemotron-8b"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny bidirectional Mistral checkpoint (256 wide, so K-quants need no fallbacks), built once."""
    from tests.hf_tokenizers import mistral_tokenizer_dir
    from tests.synth import build_checkpoint

    root = tmp_path_factory.mktemp("first-run")
    return build_checkpoint(root / "ckpt", mistral_tokenizer_dir(root / "tok"), "MistralModel")


def offline(tmp_path: Path) -> dict[str, str]:
    """A fresh models home and an empty Hugging Face cache that is never left."""
    return {"EMBEDRUNNER_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def test_disk_plan_from_registry_shapes_offline(tmp_path) -> None:
    """Nothing on disk, hub unreachable: the download is parameters x 2 bytes, the GGUFs are the plan's rows."""
    doc = json.loads(run_cli("plan", "-m", NEMOTRON, "--cpu", "--ram", "16GiB", "--json", env=offline(tmp_path)).stdout)
    d, chosen = doc["disk"], doc["chosen"]
    assert [i["what"] for i in d["items"]] == ["download", "F16", chosen["quant"]]
    download, f16, quant = d["items"]
    params = sum(math.prod(t.shape) for t in resolve_shape(NEMOTRON).tensors)
    assert download["bytes"] == 2 * params and 14.9e9 < download["bytes"] < 15.1e9  # 7.5 B parameters in bf16
    assert d["download_from"].startswith("estimated") and not download["exact"]
    assert f16["bytes"] == doc["quants"][0]["file_bytes"] and quant["bytes"] == chosen["file_bytes"]
    assert d["needs_bytes"] == sum(i["bytes"] for i in d["items"]) and d["cached_bytes"] == 0
    assert download["path"] == str(tmp_path / "hf" / "hub" / "models--nvidia--llama-embed-nemotron-8b")
    assert f16["path"] == str(tmp_path / "home" / NEMOTRON / f"{NEMOTRON}-F16.gguf")
    (volume,) = d["volumes"]  # whether 30 GB fits depends on this machine's disk: only that it is counted right
    assert volume["needs_bytes"] == d["needs_bytes"] and volume["fits"] == (volume["free_bytes"] >= d["needs_bytes"])
    text = run_cli("plan", "-m", "nv-embed-v2", "--cpu", "--ram", "16GiB", env=offline(tmp_path)).stdout
    assert "disk: writes" in text and "  head " in text  # NV-Embed's pooling head sidecar is written too


def test_download_bytes_from_the_hub_listing(monkeypatch, tmp_path) -> None:
    """Online, the download is what the hub lists for the files `download` fetches, less what is cached."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.file_download import DryRunFileInfo

    listing = [("model-00001-of-00002.safetensors", 9_900_000_000, True), ("model-00002-of-00002.safetensors",
               5_100_000_000, False), ("config.json", 800, True), ("tokenizer.json", 9_100_000, False)]  # fmt: skip

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, dry_run=False, **kw):
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        assert repo_id == "nvidia/llama-embed-nemotron-8b" and dry_run and allow_patterns == HUB_PATTERNS
        return [DryRunFileInfo("0" * 40, n, f, "", cached, not cached) for f, n, cached in listing]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(tmp_path / "home"))
    plan = disk.for_run(NEMOTRON, "Q4_K_M")
    download = plan.items[0]
    assert plan.download_from == "hub listing" and download.exact
    assert download.bytes == sum(n for _, n, _ in listing) and download.have == 9_900_000_800
    assert plan.needs == download.needs + plan.items[1].bytes + plan.items[2].bytes
    assert [i.what for i in plan.items] == ["download", "F16", "Q4_K_M"]


def test_disk_plan_matches_the_bytes_written(ckpt, tmp_path, monkeypatch) -> None:
    """Before conversion the F16 and quant sizes come from config.json: tensor bytes exact, the header (mostly
    the tokenizer) estimated; once the F16 is on disk every quant is sized from its header: predicted = written."""
    env = offline(tmp_path)
    monkeypatch.setenv("EMBEDRUNNER_HOME", env["EMBEDRUNNER_HOME"])  # plan here what the subprocesses write
    before = plan_for(str(ckpt), "Q4_K_M", 512, hardware=CPU_16G).disk
    assert [(i.what, i.exact, i.have) for i in before.items] == [("F16", False, 0), ("Q4_K_M", False, 0)]
    run_cli("embed", "-m", str(ckpt), "--auto-quant", "--quant", "Q4_K_M", "-q", "hello", env=env)
    estimated_header = resolve_shape(str(ckpt)).header_bytes
    for item in before.items:
        header = read_tensors(item.path)[1]
        assert item.bytes - estimated_header == item.path.stat().st_size - header, item  # every tensor, exactly
        assert abs(estimated_header - header) < MIB  # 32000 tokens: under 1 % of an 8B file's 15 GB
    after = plan_for(str(ckpt), "Q4_K_M", 512, hardware=CPU_16G).disk
    assert after.needs == 0 and after.cached == before.items[1].path.stat().st_size  # there: nothing to write
    f16 = before.items[0].path
    for quant in ("Q8_0", "Q5_K_M", "Q3_K_M", "Q2_K"):
        f16_item, item = disk.for_run(str(ckpt), quant).items
        assert f16_item.have == f16.stat().st_size and item.exact and item.path.parent == f16.parent
        run_cli("quantize", str(f16), "--quant", quant, "-q", env=env)
        assert item.bytes == item.path.stat().st_size, (quant, item.bytes, item.path.stat().st_size)


def test_refused_before_the_first_byte(monkeypatch, tmp_path) -> None:
    """The 8B first run against a 1 GiB disk: one line naming the bytes, the directories and the fix; nothing
    downloaded, nothing written."""
    from runner.pipeline import open_pipeline

    home, hub = tmp_path / "home", tmp_path / "hub"
    monkeypatch.setenv("EMBEDRUNNER_HOME", str(home))
    monkeypatch.setattr(disk, "hub_cache", lambda: hub)
    monkeypatch.setattr(disk, "hub_listing", lambda repo, revision: None)  # offline, whatever this machine is
    monkeypatch.setattr(disk, "volume", lambda path: (1, GIB))
    with pytest.raises(NotEnoughDisk) as e:
        open_pipeline(NEMOTRON, "Q8_0", auto_quant=True, hardware=HardwareOptions(cpu=True, ram="16GiB"))
    where = f"{hub / 'models--nvidia--llama-embed-nemotron-8b'} and {home / NEMOTRON}"
    assert str(e.value) == (
        f"{NEMOTRON}: needs 35.40 GiB on {where} (download 13.98 GiB, F16 13.99 GiB, Q8_0 7.43 GiB), "
        "1.00 GiB free; free space or set EMBEDRUNNER_HOME and HF_HOME to a bigger disk"
    )
    assert not home.exists() and not hub.exists()


def _mount_tmpfs(path: Path, nbytes: int) -> bool:
    path.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={nbytes // 1024}k", "tmpfs", str(path)]
    return subprocess.run(mount, capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_small_filesystem_refuses_and_a_big_enough_one_does_not(ckpt, tmp_path) -> None:
    """A real filesystem: just too small for the predicted bytes -> refused, untouched; 1 MiB over -> converts."""
    need = disk.for_convert(str(ckpt), tmp_path, "f16").needs
    small, enough = tmp_path / "small", tmp_path / "enough"
    if not _mount_tmpfs(small, need - MIB):
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert _mount_tmpfs(enough, need + MIB)
        try:
            proc = run_cli("convert", str(ckpt), "--outdir", str(small / "out"), check=False)
            assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
            assert f"needs {need / MIB:.1f} MiB on {small / 'out'}" in proc.stderr
            assert proc.stderr.rstrip().endswith("free space or pass another --outdir")
            assert not any(small.iterdir())
            env = {"EMBEDRUNNER_HOME": str(small)}
            proc = run_cli("embed", "-m", str(ckpt), "--auto-quant", "--cpu", "hello", "-q", env=env, check=False)
            assert proc.returncode == 1 and "free space or set EMBEDRUNNER_HOME" in proc.stderr, proc.stderr
            assert not any(small.iterdir())
            out = run_cli("convert", str(ckpt), "--outdir", str(enough / "out"), "-q").stdout.strip()
            assert Path(out).stat().st_size <= need
        finally:
            subprocess.run(["umount", str(enough)], check=False)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def on_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """`runner ARGS` with stderr on a pseudo-terminal (150 x 40): its return code and what the terminal got."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # tqdm draws nothing at 0 x 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *args], stdout=subprocess.DEVNULL, stderr=slave, env={**os.environ, **env}
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    proc.wait()
    reader.join()
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def test_progress_on_a_terminal_and_not_in_a_pipe(ckpt, tmp_path) -> None:
    env = offline(tmp_path)
    rc, screen = on_terminal("convert", str(ckpt), "--outdir", str(tmp_path / "tty"), env=env)
    assert rc == 0 and "convert ckpt-F16.gguf:" in screen and "%|" in screen and " tensors]" in screen, screen
    assert re.search(r"convert: ckpt-F16.gguf, \d+ tensors, [\d.]+ MiB in", screen)  # the summary line stays
    f16 = tmp_path / "tty" / "ckpt-F16.gguf"
    # Redraw on every update (tqdm reads TQDM_* defaults): a tiny model is quantized faster than the 0.1 s between
    # draws, and this shows that llama.cpp's per-tensor log lines drive the bar.
    rc, screen = on_terminal("quantize", str(f16), "--quant", "Q8_0", env=env | {"TQDM_MININTERVAL": "0"})
    assert rc == 0 and "quantize Q8_0:" in screen and "%|" in screen and " tensors]" in screen, screen
    assert "quantize: ckpt-Q8_0.gguf," in screen

    piped = run_cli("convert", str(ckpt), "--outdir", str(tmp_path / "pipe"), env=env)
    assert piped.stderr.startswith("convert: ckpt-F16.gguf, ") and "\r" not in piped.stderr
    assert piped.stderr.count("\n") == 1, piped.stderr  # one summary line, no bar
    piped = run_cli("quantize", str(tmp_path / "pipe" / "ckpt-F16.gguf"), "--quant", "Q8_0", env=env)
    # One summary line, then the quant's retention: measured at once when the probe takes seconds, else (a loaded
    # machine) one line saying how to measure it.
    lines = piped.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("quantize: ckpt-Q8_0.gguf,"), piped.stderr
    assert re.match(r"retention (ckpt-Q8_0\.gguf: mean cosine|of ckpt-Q8_0\.gguf not measured)", lines[1]), lines
    rc, screen = on_terminal("quantize", str(f16), "--quant", "Q4_K_M", "-q", env=env)
    assert rc == 0 and screen == ""


def test_keep_f16_rm_and_prune(ckpt, tmp_path) -> None:
    env = offline(tmp_path)
    home = tmp_path / "home" / "ckpt"
    first = run_cli("embed", "-m", str(ckpt), "--auto-quant", "--quant", "Q8_0", "--no-keep-f16", "hi", env=env)
    steps = [line.split(" ")[0] for line in first.stderr.splitlines()]
    assert steps == ["plan:", "convert:", "quantize:", "retention", "removed", "pinned", "embedded"], first.stderr
    assert "removed ckpt-F16.gguf (" in first.stderr and "--no-keep-f16" in first.stderr
    assert sorted(p.name for p in home.glob("*.gguf")) == ["ckpt-Q8_0.gguf"]
    assert list(json.loads((home / "manifest.json").read_text())["files"]) == ["ckpt-Q8_0.gguf"]
    again = run_cli("embed", "-m", str(ckpt), "--auto-quant", "--quant", "Q8_0", "hi", env=env)
    assert "convert" not in again.stderr and "disk: nothing to write" in again.stderr  # no new conversion
    kept = run_cli("embed", "-m", str(ckpt), "--auto-quant", "--quant", "Q4_K_M", "hi", env=env)
    assert "kept ckpt-F16.gguf (" in kept.stderr and (home / "ckpt-F16.gguf").is_file()

    (home / ".ckpt-Q6_K.gguf.partial-999999999").write_bytes(b"x" * 1000)  # a writer killed mid-file
    manifest = json.loads((home / "manifest.json").read_text())
    manifest["files"]["ckpt-Q2_K.gguf"] = {"quant": "Q2_K", "bytes": 1}  # a file deleted by hand
    (home / "manifest.json").write_text(json.dumps(manifest))
    pruned = run_cli("models", "--prune", env=env).stdout
    assert "pruned " + str(home / ".ckpt-Q6_K.gguf.partial-999999999") in pruned and "pruned 1 file(s)" in pruned
    assert "ckpt-Q2_K.gguf" not in (home / "manifest.json").read_text()
    assert "ckpt  (converted checkpoint)" in pruned

    removed = run_cli("rm", "ckpt", "--quant", "Q8_0", env=env).stdout
    assert f"removed {home / 'ckpt-Q8_0.gguf'}" in removed and not (home / "ckpt-Q8_0.gguf").exists()
    assert sorted(json.loads((home / "manifest.json").read_text())["files"]) == ["ckpt-F16.gguf", "ckpt-Q4_K_M.gguf"]
    missing = run_cli("rm", "ckpt", "--quant", "Q8_0", env=env, check=False)
    assert missing.returncode == 1 and "no Q8_0 file here (have F16, Q4_K_M)" in missing.stderr
    run_cli("rm", "ckpt", env=env)
    assert not home.exists()


def test_a_conversion_with_its_own_pooling_is_seen_as_current(ckpt, tmp_path, monkeypatch) -> None:
    """The stamp the plan compares is the one convert writes, pooling and attention included: a checkpoint
    whose sentence-transformers files say CLS, converted once, needs nothing more, as convert then reuses it."""
    cls = tmp_path / "cls-ckpt"
    shutil.copytree(ckpt, cls)
    (cls / "1_Pooling").mkdir()
    (cls / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    env = offline(tmp_path)
    monkeypatch.setenv("EMBEDRUNNER_HOME", env["EMBEDRUNNER_HOME"])
    assert disk.for_convert(str(cls), None, "f16").needs > 0
    run_cli("convert", str(cls), "-q", env=env)
    assert disk.for_convert(str(cls), None, "f16").needs == 0
    assert disk.for_run(str(cls), "F16").needs == 0
    assert disk.for_convert(str(cls), None, "f16", pooling="mean").needs > 0  # another pooling: a new file
