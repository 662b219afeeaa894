"""The auto-quant policy: which quant, and how many layers on which GPU, for this model on this machine.

Rule, in order:
1. `--quant Q` always wins: Q with the most GPU layers that fit (else CPU), or a clear error.
2. With a usable GPU: the highest-fidelity quant (F16 > Q8_0 > Q6_K > ... > Q2_K, within
   --max-quant/--min-quant) whose every layer fits on the GPU(s), layers split in proportion to free
   memory across GPUs. Measured fidelity outranks the ladder: when the ladder's pick has a cosine to F16
   measured on this model (`runner retention`), the quant that fits with the highest measured cosine wins, so a
   smaller quant made with an importance matrix beats a larger one it out-measures. The i-quants (IQ4_XS ...,
   made only with an importance matrix) are candidates once measured on this model, in bits-per-weight order.
3. Else a partial offload among the acceptable quants (Q8_0 down to Q4_K_M — below that retention
   drops fast, see the README): the one that leaves the fewest weight bytes on the CPU, because the CPU
   layers set the speed (they run an order of magnitude slower than GPU layers); ties go to fidelity.
4. Else (no GPU, or nothing offloads): the CPU plan, among the quants that fit in free RAM, by --prefer:
   - fidelity: the highest-fidelity quant (F16 included; measured fidelity outranks the ladder as in 2);
   - balanced (the default): the fastest on this CPU whose cosine to F16, measured on this model's own files
     (`runner retention`, recorded in its manifest.json), is >= 0.999; an unmeasured quant never qualifies;
   - speed: the fastest at Q4_K_M or above.
   Speed on a CPU depends on the CPU (on one AVX2 EPYC F16 was fastest, on another Q6_K ran 1.9x F16), so
   it comes from this machine's calibration (`runner calibrate`, planner/calibration.py); without one,
   fidelity decides and the plan says how to make one.
GPU plans keep rules 2-3 whatever --prefer says, until GPU speeds are measured.
BF16: for a model published in bfloat16 (config.json's torch_dtype) a BF16 file holds the weights exactly at F16's
size, so it sits beside F16 at the same fidelity. F16 stays first (GPU plans, and CPUs that did not time BF16);
where this CPU's calibration timed both (it times BF16 where the CPU has BF16 units: AVX512-BF16 or AMX), the
faster of the two is taken, by every --prefer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from planner.hardware import NO_OFFLOAD, Hardware
from planner.memory import Needs, Settings, needs
from planner.shapes import ModelShape
from quantize.errors import BadInput
from quantize.quants import FIDELITY, SIZED, UNQUANTIZED

if TYPE_CHECKING:
    from planner.calibration import Calibration
    from planner.disk import DiskPlan

PREFERENCES = ("fidelity", "balanced", "speed")
BALANCED_COSINE = 0.999  # --prefer balanced: the least expected cosine to F16
SPEED_FLOOR = "Q4_K_M"  # --prefer speed: nothing below this (retention drops fast below it)
RETENTION_HINT = "`runner retention -m MODEL` measures them"
CALIBRATE_HINT = "no CPU calibration for this machine: `runner calibrate -m MODEL` measures one (about 2 minutes)"
ACCEPTABLE_PARTIAL = FIDELITY[: FIDELITY.index("Q4_K_M") + 1]
MAX_LENGTH_CAP = 8192  # default --max-length: the model's max length, at most this (compute grows with it)
GIB = 2**30
SHORTER = "try a shorter --max-length"  # what a plan that fits nowhere, even at Q2_K, can still change


@dataclass(frozen=True)
class Row:
    quant: str
    fits: str  # gpu | split | cpu | no
    gpu_layers: tuple[int, ...]
    needs: Needs
    cpu_tokens_per_s: float | None = None  # predicted on this CPU from its calibration; None: not measured
    retention: float | None = None  # mean cosine to F16 measured on this model (runner.retention); None: unmeasured

    @property
    def n_gpu_layers(self) -> int:
        return sum(self.gpu_layers)

    def as_json(self) -> dict:
        return {
            "quant": self.quant,
            "file_bytes": self.needs.file,
            "gpu_bytes": self.needs.gpu_total,
            "gpu_bytes_per_device": list(self.needs.gpu),
            "ram_bytes": self.needs.ram,
            "fits": self.fits,
            "n_gpu_layers": self.n_gpu_layers,
            "devices": self.needs.as_json(),
            "cpu_tokens_per_s": self.cpu_tokens_per_s,
            "expected_cosine_to_f16": self.retention,
        }


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    hardware: Hardware
    settings: Settings
    rows: tuple[Row, ...]
    chosen: Row
    reason: str
    prefer: str = "balanced"
    disk: DiskPlan | None = None  # what the run will write (planner.disk); plan_for fills it in
    calibration: Calibration | None = None  # where the CPU speeds come from; plan_for fills it in

    @property
    def device(self) -> str:
        return self.chosen.fits

    @property
    def tensor_split(self) -> list[float] | None:
        layers = self.chosen.gpu_layers
        return [n / sum(layers) for n in layers] if len(layers) > 1 and sum(layers) else None

    def summary(self) -> str:
        c = self.chosen
        where = {"gpu": "all layers on GPU", "split": f"{c.n_gpu_layers}/{self.shape.layers} layers on GPU"}
        return (
            f"plan: {self.shape.name} {c.quant}, {where.get(c.fits, 'CPU only')}, "
            f"GPU {c.needs.gpu_total / GIB:.1f} GiB, RAM {c.needs.ram / GIB:.1f} GiB, "
            f"max length {self.settings.max_length} — {self.reason}" + (f"; {self.disk.summary()}" if self.disk else "")
        )

    def as_json(self) -> dict:
        chosen = self.chosen.as_json() | {"device": self.device, "tensor_split": self.tensor_split}
        return {
            "model": self.shape.name,
            "hardware": self.hardware.as_json(),
            "max_length": self.settings.max_length,
            "n_ubatch": self.settings.ubatch,
            "chosen": chosen,
            "reason": self.reason,
            "prefer": self.prefer,
            "quants": [r.as_json() for r in self.rows],
            "disk": self.disk.as_json() if self.disk else None,
            "calibration": self.calibration.taken() if self.calibration else None,
        }


def max_length_for(asked: int | None, model_max: int | None, context: int) -> int:
    """The longest sequence a run holds, and so where inputs are cut: what was ASKED for, else the model's
    own max length (registry or GGUF), else MAX_LENGTH_CAP; never past the trained CONTEXT.

    The planner and the engine both take it from here, so a run never grows past what was planned.
    """
    if asked is not None and asked < 1:
        raise BadInput(f"--max-length {asked}: must be at least 1")
    if asked is not None:
        return min(asked, context)
    return min(model_max or MAX_LENGTH_CAP, context, MAX_LENGTH_CAP)


def split_layers(n: int, free: list[int]) -> tuple[int, ...]:
    """N layers over GPUs in proportion to their free memory (largest remainders get the rest)."""
    total = sum(free)
    if not total:
        return tuple(0 for _ in free)
    exact = [n * f / total for f in free]
    out = [int(x) for x in exact]
    for i in sorted(range(len(free)), key=lambda i: exact[i] - out[i], reverse=True)[: n - sum(out)]:
        out[i] += 1
    return tuple(out)


def evaluate(shape: ModelShape, quant: str, hw: Hardware, s: Settings) -> Row:
    """QUANT's best placement on HW: every layer on GPU, else the most layers that fit, else CPU."""
    gpus = hw.usable_gpus()
    free = [g.free for g in gpus]

    def fits(layers: tuple[int, ...]) -> Needs | None:
        n = needs(shape, quant, s, layers)
        ok = n.ram <= hw.ram_free and all(need <= f for need, f in zip(n.gpu, free, strict=True))
        return n if ok else None

    if gpus:
        # GPU bytes grow with the layers put there and RAM bytes shrink, so the most layers the GPUs hold is
        # found by halving, and it fits or no count does (one count at a time, a 512-layer model took minutes).
        low, high = 0, shape.layers  # the GPUs hold `low` layers; more than `high` they do not
        while low < high:
            mid = (low + high + 1) // 2
            on_gpus = needs(shape, quant, s, split_layers(mid, free)).gpu
            if all(need <= f for need, f in zip(on_gpus, free, strict=True)):
                low = mid
            else:
                high = mid - 1
        layers = split_layers(low, free)
        if low and (n := fits(layers)) is not None:
            return Row(quant, "gpu" if low == shape.layers else "split", layers, n)
    if (n := fits(tuple(0 for _ in gpus))) is not None:
        return Row(quant, "cpu", (), n)
    return Row(quant, "no", (), needs(shape, quant, s))


def plan(
    shape: ModelShape,
    hw: Hardware,
    max_length: int,
    quant: str | None = None,
    max_quant: str | None = None,
    min_quant: str | None = None,
    prefer: str = "balanced",
    cpu_speeds: dict[str, float] | None = None,
    retention: dict[str, float] | None = None,
) -> Plan:
    """The plan for SHAPE on HW. CPU_SPEEDS: predicted tokens/s per quant on this CPU (calibration), if any.
    RETENTION: mean cosine to F16 per quant, measured on this model's own files (F16 is 1 by definition)."""
    if prefer not in PREFERENCES:
        raise BadInput(f"--prefer {prefer}: choose from {', '.join(PREFERENCES)}")
    s = Settings(max_length, hw.embeddings_only)
    speeds = cpu_speeds or {}
    # Retention is the cosine to the model's unquantized weights, which `runner retention` reads from its F16 file,
    # else F32 or BF16. Both unquantized types count as 1: F16 by definition, and BF16, for a model published in
    # bfloat16, because it holds those weights bit for bit (F16 holds them too, but for values past its range:
    # below ~6e-5 it keeps fewer bits, above 65504 none). Their vectors differ past the fifth digit either way
    # (llama.cpp rounds a matmul's activations to bf16 for BF16 weights, to f16 for F16), both inside the parity
    # bound of the float32 reference (tests/test_bf16.py), so between the two speed decides on a CPU that timed both
    # (`most_faithful`); on a GPU, and untimed, F16 stays first.
    bf16 = {"BF16": 1.0} if shape.dtype == "bfloat16" else {}
    kept = {**(retention or {}), "F16": 1.0, **bf16}
    # The ladder (BF16 beside F16 for a bfloat16 model), and the i-quants this model has measured files of, by bpw.
    order = [q for q in SIZED if q in FIDELITY or q in kept]
    rows = tuple(
        replace(evaluate(shape, q, hw, s), cpu_tokens_per_s=speeds.get(q), retention=kept.get(q)) for q in order
    )
    by_quant = {r.quant: r for r in rows}

    def done(row: Row, reason: str) -> Plan:
        row = replace(row, cpu_tokens_per_s=speeds.get(row.quant), retention=kept.get(row.quant))
        # The table shows the chosen quant where it runs (a quant re-planned for the CPU is no longer "split").
        return Plan(shape, hw, s, tuple(row if r.quant == row.quant else r for r in rows), row, reason, prefer)

    cannot_offload = bool(hw.gpus) and not hw.offload
    if quant:
        quant = _check(quant, "--quant", SIZED)
        row = by_quant.get(quant) or evaluate(shape, quant, hw, s)
        if row.fits == "no":
            lower = [r.quant for r in rows if r.fits != "no" and SIZED.index(r.quant) > SIZED.index(quant)]
            raise BadInput(_no_fit(shape, row, hw, s, f"try --quant {lower[0]}" if lower else SHORTER))
        return done(row, f"{quant} was asked for" + (f"; {NO_OFFLOAD}" if cannot_offload else ""))
    hi = order.index(_check(max_quant, "--max-quant", order)) if max_quant else 0
    lo = order.index(_check(min_quant, "--min-quant", order)) if min_quant else len(order) - 1
    if hi > lo:
        raise BadInput(f"--max-quant {max_quant} is below --min-quant {min_quant}; swap them")
    allowed = [by_quant[q] for q in order[hi : lo + 1]]
    if on_gpu := [r for r in allowed if r.fits == "gpu"]:
        return done(most_faithful(on_gpu), "the highest-fidelity quant that fits entirely on the GPU")
    partial = [r for r in allowed if r.fits == "split" and r.quant in ACCEPTABLE_PARTIAL]
    if partial:
        best = min(partial, key=lambda r: (r.needs.ram, order.index(r.quant)))
        return done(best, "nothing fits on the GPU whole; this leaves the least on the CPU, which sets the speed")
    on_cpu = [
        replace(evaluate(shape, r.quant, _cpu_only(hw), s), retention=r.retention)
        for r in allowed
        if r.fits in ("cpu", "split")
    ]
    on_cpu = [r for r in on_cpu if r.fits == "cpu"]
    if not on_cpu:
        smallest = allowed[-1]  # never empty: hi <= lo was checked above
        if lo < len(order) - 1:  # what runs lies below the user's --min-quant: name it, not a --quant past it
            try:
                below = plan(shape, hw, max_length, None, max_quant, None, prefer, cpu_speeds).chosen.quant
                hint = f"lower --min-quant to {below}"
            except BadInput:
                hint = SHORTER
        else:
            split = [r.quant for r in allowed if r.fits == "split"]  # below Q4_K_M: only when asked for
            hint = f"try --quant {split[0]} (part on the GPU)" if split else SHORTER
        raise BadInput(_no_fit(shape, smallest, hw, s, hint))
    if cannot_offload:
        why = NO_OFFLOAD
    else:
        why = "no usable GPU" if not hw.usable_gpus() else "too little GPU memory for an acceptable quant"
    # balanced passes over a quant only for want of a measurement: the reason says which, and how to measure it.
    unmeasured = [r.quant for r in on_cpu if r.quant in speeds and r.quant not in kept] if prefer == "balanced" else []
    if prefer == "balanced":
        fast = [r for r in on_cpu if r.quant in speeds and kept.get(r.quant, 0.0) >= BALANCED_COSINE]
        rule = f"the fastest quant on this CPU that keeps >= {BALANCED_COSINE} cosine to F16, measured on this model"
    elif prefer == "speed":
        fast = [r for r in on_cpu if r.quant in speeds and order.index(r.quant) <= order.index(SPEED_FLOOR)]
        rule = f"the fastest quant on this CPU at {SPEED_FLOOR} or above"
    else:
        best = most_faithful(on_cpu, speeds)
        return done(best, f"{why}; the highest-fidelity quant that fits in RAM{_faster_than_f16(best, speeds)}")
    if fast:
        best = max(fast, key=lambda r: (speeds[r.quant], -order.index(r.quant)))
        faster = [q for q in unmeasured if speeds[q] > speeds[best.quant]]
        note = f"; {', '.join(faster)} faster but unmeasured: {RETENTION_HINT}" if faster else ""
        return done(best, f"{why}; {rule} ({speeds[best.quant]:.0f} tokens/s predicted){note}")
    hint = CALIBRATE_HINT if not speeds else "no calibrated quant qualifies"
    if unmeasured:
        hint += f"; {RETENTION_HINT}"
    best = most_faithful(on_cpu, speeds)
    return done(best, f"{why}; the highest-fidelity quant that fits in RAM{_faster_than_f16(best, speeds)} ({hint})")


def most_faithful(rows: list[Row], speeds: dict[str, float] | None = None) -> Row:
    """The highest-fidelity of ROWS (in ladder order, not empty): the ladder's first, unless it was measured on
    this model, then the highest measured cosine to F16 among them; ties to the larger quant, but between F16 and BF16
    (a bfloat16 model's, both 1) to the faster on this CPU by SPEEDS."""
    if rows[0].retention is None:
        return rows[0]
    measured = [r for r in rows if r.retention is not None]
    speeds = {q: v for q, v in (speeds or {}).items() if q in UNQUANTIZED}
    return max(measured, key=lambda r: (r.retention, speeds.get(r.quant, 0.0), -rows.index(r)))


def _faster_than_f16(row: Row, speeds: dict[str, float]) -> str:
    """What the reason adds when BF16 won over F16 on this CPU's speed."""
    if row.quant != "BF16" or not {"F16", "BF16"} <= speeds.keys():
        return ""
    return f" (BF16: the published bfloat16 weights exactly, {speeds['BF16'] / speeds['F16']:.2f}x F16's speed here)"


def _cpu_only(hw: Hardware) -> Hardware:
    return replace(hw, gpus=())


def _check(quant: str, option: str, known: list[str] = FIDELITY) -> str:
    q = quant.upper()
    if q not in known:
        raise BadInput(f"{option} {quant}: unknown quant; choose from {', '.join(known)}")
    return q


def _no_fit(shape: ModelShape, row: Row, hw: Hardware, s: Settings, hint: str) -> str:
    """ROW's quant does not fit: what it needs, what there is, HINT (what would run), and what machine would."""
    vram = sum(g.free for g in hw.usable_gpus())
    have = f"{hw.ram_free / GIB:.1f} GiB RAM" + (f" + {vram / GIB:.1f} GiB GPU" if vram else "")
    on_gpu = needs(shape, row.quant, s, (shape.layers,)).gpu_total
    return (
        f"{shape.name} does not fit: {row.quant} needs {row.needs.ram / GIB:.1f} GiB RAM on the CPU, have {have}; "
        f"{hint}, or a machine with {math.ceil(row.needs.ram / GIB)} GiB free RAM or "
        f"{math.ceil(on_gpu / GIB)} GiB free on a GPU"
    )
