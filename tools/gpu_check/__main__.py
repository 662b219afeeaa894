"""`scripts/gpu-check pack | dry-run | run --out DIR` (and the hidden `child KIND`, which the steps start)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import tools.gpu_check
from tools.gpu_check import LAYERS, LENGTHS, MIB, PACK, TEXTS, children
from tools.gpu_check.pack import CARRY_LIMIT, PACK_LIMIT, check_size, pack
from tools.gpu_check.steps import DEADLINE, dry_run, gpu_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check", description=tools.gpu_check.__doc__.split("\n\n")[0])
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
    c.add_argument("kind", choices=["ours", "torch", "smollm2", "ballast", "vram", "files"])
    c.add_argument("path", type=Path, nargs="?", help="a GGUF (ours, vram) or a work folder (smollm2, files)")
    c.add_argument("--texts", type=int, default=TEXTS)
    c.add_argument("--layers", type=int, default=LAYERS)
    c.add_argument("--latency", action="store_true")
    c.add_argument("--bytes", type=int, default=0)
    c.add_argument("--gpu-layers", type=int, default=LAYERS)
    c.add_argument("--max-length", default=",".join(map(str, LENGTHS)), help="comma-separated")
    c.add_argument("--quants", default="F16", help="comma-separated")
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
        children.child_ours(args.path, args.texts, args.latency)
    elif args.kind == "torch":
        children.child_torch(args.texts, args.layers)
    elif args.kind == "smollm2":
        children.child_smollm2(args.path, args.texts)
    elif args.kind == "ballast":
        children.child_ballast(args.bytes)
    elif args.kind == "vram":
        children.child_vram(args.path, args.gpu_layers, [int(n) for n in args.max_length.split(",")])
    else:
        children.child_files(args.path, args.layers, args.quants.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
