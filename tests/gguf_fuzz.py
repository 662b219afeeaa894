"""A seeded GGUF fuzzer: structure-aware mutations of a small model's header and metadata, and a worker that
runs `runner` commands on them.

`mutations(base, seed, n)` yields (description, file bytes); the same seed gives the same files. Mutations
aim where a hostile file would: byte flips and truncations in the header, huge counts and lengths, wrong
types and absurd values for the keys llama.cpp and the runner read, broken tensor infos and vocabularies.

`python -m tests.gguf_fuzz TASKS.json` is the worker: it runs each task's `runner` command line through the
CLI entry point in this one process (a crash of llama.cpp kills the worker, which its parent sees and
reports, then starts a new worker for the remaining tasks; a hang is ended by faulthandler). It prints a
JSON line before and after each task, so the parent knows which one was running when it died.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import random
import struct
import sys
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from tests.gguf_edit import ARRAY, BOOL, F32, I32, STRING, U32, U64, Entry, Gguf

TASK_TIMEOUT = 30  # seconds; the runs take well under one
MARK = "FUZZ "  # starts the worker's own lines (a dying llama.cpp prints a backtrace to stdout too)
HUGE = [0, 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]
ODD_INTS = [0, 1, 2, 3, 7, 100, 511, 512, 513, 10**6, 2**31 - 1, 2**32 - 1]
ODD_FLOATS = [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf")]
# Keys the runner or llama.cpp reads; {arch} is the file's architecture.
KEYS = [
    "general.architecture", "general.alignment", "general.name", "general.file_type",
    "{arch}.block_count", "{arch}.context_length", "{arch}.embedding_length", "{arch}.feed_forward_length",
    "{arch}.attention.head_count", "{arch}.attention.head_count_kv", "{arch}.attention.layer_norm_rms_epsilon",
    "{arch}.attention.causal", "{arch}.attention.key_length", "{arch}.attention.value_length",
    "{arch}.rope.freq_base", "{arch}.rope.dimension_count", "{arch}.rope.scaling.type", "{arch}.rope.scaling.factor",
    "{arch}.vocab_size", "{arch}.pooling_type", "{arch}.expert_count", "{arch}.expert_used_count",
    "{arch}.nextn_predict_layers",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.seperator_token_id", "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token",
    "tokenizer.huggingface.json",
    "embedrunner.pooling", "embedrunner.max_length", "embedrunner.prompt.query", "embedrunner.prompt.document",
    "embedrunner.prompt.default_task", "embedrunner.tokenizer", "embedrunner.head.file", "embedrunner.head.sha256",
    "embedrunner.append_eos", "embedrunner.pooling.skip_instruction", "embedrunner.license_note",
]  # fmt: skip
OWN_VALUES = {
    "embedrunner.prompt.query": [
        "{text:>300000000}", "{text.__class__.__mro__}", "{task}{text}{0}", "{", "}", "{text}" * 3, "no text",
        "Instruct: {task}\nQuery: {text}", "x" * 100_000 + "{text}", "{task!r}{text}", "{text}{{text}}",
    ],
    "embedrunner.prompt.document": ["{text:>300000000}", "{task}{text}", "{}", "{text.real}", "", "{text}\0"],
    "embedrunner.prompt.default_task": ["{text}", "x" * 100_000, "", "{task}"],
    "embedrunner.head.file": ["../evil.head.gguf", "/etc/passwd", ".", "..", "", "a/b.gguf", "x\0y", "nope.gguf"],
    "embedrunner.pooling": ["latent-attention", "none", "rank", "", "mean\0"],
    "embedrunner.tokenizer": ["huggingface", "llama", ""],
    "tokenizer.huggingface.json": ["", "{", "[]", '{"model": null}', "\udcff", "null", '{"version": "1.0"}'],
    "tokenizer.ggml.model": ["gpt2", "bert", "t5", "rwkv", "ugm", "none", "", "llama\0"],
    "tokenizer.ggml.pre": ["llama3", "qwen2", "nonsense", ""],
    "general.architecture": ["llama", "bert", "qwen3", "gpt2", "clip", "", "llama-embed\0", "x" * 300],
    "{arch}.rope.scaling.type": ["yarn", "longrope", "bogus", ""],
}  # fmt: skip


def mutations(base: Gguf, seed: int, n: int) -> Iterator[tuple[str, bytes]]:
    """N mutated files of BASE, reproducible from SEED: (what was done, the file's bytes)."""
    rng = random.Random(seed)
    blob = base.to_bytes()
    kinds = [
        (_flip_bits, 4), (_truncate, 2), (_slot, 4), (_known_key, 6), (_own_key, 3), (_tensor_info, 3), (_vocab, 3),
    ]  # fmt: skip
    choices = [k for k, w in kinds for _ in range(w)]
    for i in range(n):
        mutate = rng.choice(choices)
        what, data = mutate(base, blob, rng)
        yield f"#{i} {mutate.__name__.strip('_')}: {what}", data


def _flip_bits(base: Gguf, blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    out = bytearray(blob)
    where = sorted(rng.randrange(base.header_size) for _ in range(rng.randint(1, 6)))
    for pos in where:
        out[pos] ^= 1 << rng.randrange(8)
    return f"bits flipped at {where}", bytes(out)


def _truncate(base: Gguf, blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    end = rng.randrange(base.header_size) if rng.random() < 0.7 else rng.randrange(len(blob))
    return f"cut at byte {end} of {len(blob)}", blob[:end]


def _slot(base: Gguf, blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A count, length, type, dimension or scalar field of the header set to an extreme."""
    slot = rng.choice(base.slots)
    size = struct.calcsize("<" + slot.fmt)
    if slot.fmt in "fd":
        value = rng.choice(ODD_FLOATS)
    elif slot.kind == "type":
        value = rng.choice([*range(16), 2**31, 2**32 - 1]) % (1 << (8 * size))
    elif slot.fmt == "?":
        value = rng.choice([True, False])
    else:
        old = struct.unpack_from("<" + slot.fmt, blob, slot.offset)[0]
        value = rng.choice([*HUGE, old + 1, max(old - 1, 0), old * 2]) % (1 << (8 * size))
        if slot.fmt.islower():  # signed
            value = struct.unpack("<" + slot.fmt, value.to_bytes(size, "little"))[0]
    out = bytearray(blob)
    struct.pack_into("<" + slot.fmt, out, slot.offset, value)
    return f"{slot.kind} field of {slot.owner} at {slot.offset} = {value}", bytes(out)


def _other_value(rng: random.Random, entry: Entry | None) -> tuple[int, object]:
    """A value of a random type, or of the entry's own type but absurd."""
    if entry is not None and rng.random() < 0.5 and entry.vtype in (U32, I32, U64):
        return entry.vtype, rng.choice(ODD_INTS) if entry.vtype != I32 else rng.choice([-1, -(2**31), *ODD_INTS[:6]])
    vtype = rng.choice([U32, I32, F32, BOOL, U64, STRING, ARRAY, 0, 1, 2, 3, 11, 12])
    if vtype == STRING:
        return vtype, rng.choice(["", "x", "9" * 40, "\u00ff" * 3, "{text}"])
    if vtype == ARRAY:
        return vtype, rng.choice([[], [1, 2, 3], ["a", "b"], [0.5] * 7])
    if vtype in (F32, 12):
        return vtype, rng.choice(ODD_FLOATS)
    if vtype == BOOL:
        return vtype, rng.choice([True, False])
    if vtype in (1, 5, 11):  # signed
        return vtype, rng.choice([-1, 0, 1, 100])
    return vtype, rng.choice([0, 1, 255]) if vtype in (0, 2) else rng.choice(ODD_INTS)


def _known_key(base: Gguf, blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    arch = base.value("general.architecture")
    key = rng.choice(KEYS).format(arch=arch)
    entry = base.find(key)
    action = rng.choice(["set", "set", "set", "drop", "twice"]) if entry else "set"
    if action == "drop":
        return f"{key} dropped", base.drop(key).to_bytes()
    if action == "twice":
        g = replace(base, entries=[*base.entries, entry])
        return f"{key} twice", g.to_bytes()
    vtype, value = _other_value(rng, entry)
    try:
        g = base.set(key, value, vtype)
    except struct.error:  # the value does not fit the type: store its string form instead
        g, vtype, value = base.set(key, str(value), STRING), STRING, str(value)
    return f"{key} = {value!r:.60} (type {vtype})", g.to_bytes()


def _own_key(base: Gguf, blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    arch = base.value("general.architecture")
    key = rng.choice(list(OWN_VALUES))
    value = rng.choice(OWN_VALUES[key])
    g = base.set(key.format(arch=arch), value.encode("utf-8", "surrogateescape"), STRING)
    if key == "embedrunner.head.file" or (key == "embedrunner.pooling" and value == "latent-attention"):
        g = g.set("embedrunner.pooling", b"latent-attention", STRING).set("embedrunner.head.sha256", "0" * 64, STRING)
    if key == "tokenizer.huggingface.json":
        g = g.set("embedrunner.tokenizer", b"huggingface", STRING)
    return f"{key.format(arch=arch)} = {value!r:.60}", g.to_bytes()


def _tensor_info(base: Gguf, blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    i = rng.randrange(len(base.tensors))
    t = base.tensors[i]
    what = rng.choice(["type", "dims", "swap", "offset", "name", "drop", "twice"])
    tensors = list(base.tensors)
    if what == "type":
        t = replace(t, qtype=rng.choice([0, 1, 2, 8, 10, 14, 15, 24, 26, 28, 30, 39, 41, 99]))
    elif what == "dims":
        dims = list(t.dims)
        dims[rng.randrange(len(dims))] = rng.choice([0, 1, 3, 2**31, 2**40, 2**63])
        t = replace(t, dims=dims)
    elif what == "swap":
        t = replace(t, dims=list(reversed(t.dims)))
    elif what == "offset":
        t = replace(t, offset=rng.choice([t.offset + 1, t.offset + 32, len(base.data), 2**63]))
    elif what == "name":
        t = replace(
            t, name=rng.choice([base.tensors[(i + 1) % len(tensors)].name, "", "x" * 80, "blk.999.attn_q.weight"])
        )
    tensors[i] = t
    if what == "drop":
        del tensors[i]
    elif what == "twice":
        tensors.append(t)
    g = replace(base, tensors=tensors)
    return f"tensor {base.tensors[i].name}: {what} -> {t.dims} {t.qtype}", g.to_bytes()


def _vocab(base: Gguf, blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    tokens = list(base.value("tokenizer.ggml.tokens"))
    what = rng.choice(["repeat", "empty", "bytes", "drop", "invalid", "types", "scores", "special", "add_bos"])
    g = base
    if what == "repeat":
        i, j = rng.sample(range(len(tokens)), 2)
        tokens[i] = tokens[j]
    elif what == "empty":
        tokens[rng.randrange(len(tokens))] = b""
    elif what == "bytes":
        tokens[rng.randrange(3, 259)] = b"<0xZZ>"
    elif what == "drop":
        tokens.pop()
    elif what == "invalid":
        tokens[rng.randrange(len(tokens))] = b"\xff\xfe"
    elif what == "types":
        types = list(base.value("tokenizer.ggml.token_type"))
        types[rng.randrange(len(types))] = rng.choice([-1, 6, 99, 2**31 - 1])
        g = g.set("tokenizer.ggml.token_type", types, ARRAY)
    elif what == "scores":
        g = g.set("tokenizer.ggml.scores", [float("nan")] * rng.choice([1, len(tokens)]), ARRAY)
    elif what == "special":
        key = rng.choice(["bos", "eos", "unknown", "padding", "seperator"])
        g = g.set(f"tokenizer.ggml.{key}_token_id", rng.choice([len(tokens), 2**32 - 1, 3]), U32)
    elif what == "add_bos":
        g = g.drop("tokenizer.ggml.bos_token_id").set("tokenizer.ggml.add_bos_token", True, BOOL)
    if what in ("repeat", "empty", "bytes", "drop", "invalid"):
        g = g.set("tokenizer.ggml.tokens", tokens, ARRAY)
    return f"vocabulary: {what}", g.to_bytes()


# --- the worker ------------------------------------------------------------------------------------------
def _run(args: list[str]) -> dict:
    from runner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main.main(args=args, prog_name="runner", standalone_mode=True)
            rc: int | str = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:  # an exception that escaped the CLI: a traceback is a failure
            traceback.print_exc(file=err)
            rc = "traceback"
    return {"rc": rc, "stdout": out.getvalue()[-2000:], "stderr": err.getvalue()[-2000:]}


def worker(tasks_file: Path) -> None:
    tasks = json.loads(Path(tasks_file).read_text())
    for task in tasks:
        print(MARK + json.dumps({"start": task["id"]}), flush=True)
        faulthandler.dump_traceback_later(TASK_TIMEOUT, exit=True, file=sys.__stderr__)
        result = _run(task["args"])
        faulthandler.cancel_dump_traceback_later()
        print(MARK + json.dumps({"id": task["id"], **result}), flush=True)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
