"""The report of a run: report.md from what results.json holds, and made-up results for the dry run."""

from __future__ import annotations

import os
import sys

from tools.gpu_check import GIB, LAYERS, LENGTHS, SENTENCE, SMOLLM2_LAYERS, TEXTS


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
