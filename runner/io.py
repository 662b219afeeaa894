"""Reading texts (.txt, .jsonl, stdin) and writing vectors (.npy, .jsonl), atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from quantize.errors import BadInput
from quantize.files import atomic_path

FORMATS = ("npy", "jsonl")


def read_texts(path: str, field: str = "text") -> list[str]:
    """One text per line of a .txt file; in a .jsonl file, each line a JSON string or an object with FIELD.

    `-` reads plain lines from stdin.
    """
    if path == "-":
        raw = sys.stdin.buffer.read()
        name, jsonl = "<stdin>", False
    else:
        p = Path(path)
        if not p.is_file():
            raise BadInput(f"{path}: no such input file")
        raw = p.read_bytes()
        name, jsonl = path, p.suffix.lower() == ".jsonl"
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"{name}:{n}: not valid UTF-8 ({e.reason} at byte {e.start}); fix the file") from None
        if not jsonl:
            texts.append(text)
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"{name}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(obj, str):
            texts.append(obj)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise BadInput(f"{name}:{n}: no string field {field!r}; choose the field with --field")
        texts.append(obj[field])
    return texts


def output_format(path: str | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    if path and Path(path).suffix.lower().lstrip(".") in FORMATS:
        return Path(path).suffix.lower().lstrip(".")
    if path:
        raise BadInput(f"{path}: cannot tell the format from the extension; pass --format npy or jsonl")
    return "jsonl"


def write_vectors(vectors: np.ndarray, path: str | None, fmt: str) -> None:
    """Write VECTORS to PATH (or stdout as JSON lines); a file appears only when complete."""
    if path is None:
        if fmt != "jsonl":
            raise BadInput("--format npy needs --output FILE (binary output is not written to a terminal)")
        for i, v in enumerate(vectors):
            sys.stdout.write(json.dumps({"id": i, "embedding": v.tolist()}) + "\n")
        return
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            if fmt == "npy":
                np.save(f, vectors.astype(np.float32))
            else:
                for i, v in enumerate(vectors):
                    f.write((json.dumps({"id": i, "embedding": v.tolist()}) + "\n").encode())
