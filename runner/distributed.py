"""Scale-out with Ray Data (extra `ray`): one model per actor, every actor through the shared pipeline.

Two pieces:
- `RayEmbedder`, a callable class for `ds.map_batches` (Ray Data's pattern for batch inference: one
  stateful actor per GPU or per CPU slot, the model loaded once in `__init__`):

      ds.map_batches(RayEmbedder, fn_constructor_kwargs={"model": "all-minilm-l6-v2"}, concurrency=2,
                     num_gpus=0, batch_size=256)

- `embed_dataset`, behind `runner embed-dataset`: the input (parquet, jsonl or txt files; paths, globs or
  object-store URIs as pyarrow/Ray read them) is cut into shards of fixed row ranges on the driver; each
  shard is read, embedded and written to `OUTPUT_DIR/part-NNNNN.parquet` (atomically) by one actor call,
  so a rerun skips the shards already complete, and a killed actor's shard is simply done again by its
  restarted replacement: every row lands exactly once.

The GGUF is resolved (converted or quantized if missing) once on the driver; actors get its path and plan
only its placement on their own device (Ray sets CUDA_VISIBLE_DEVICES), so they never convert at once.
For a multi-node cluster, the GGUF and OUTPUT_DIR must be at the same path on every node (a shared
filesystem), or OUTPUT_DIR an object-store URI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planner import HardwareOptions
from quantize.errors import BadInput

log = logging.getLogger("runner")
INPUT_SUFFIXES = (".parquet", ".jsonl", ".txt")


def _threads_for_actor() -> int | None:
    """The CPUs Ray assigned to this actor (llama.cpp's threads), when running inside Ray."""
    with contextlib.suppress(Exception):
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1, int(cpus))
    return None


class RayEmbedder:
    """A `ds.map_batches` callable: COLUMN's texts in, float32 vectors in OUTPUT_COLUMN, rows in input order.

    quant="auto" plans for the actor's own GPU (or CPU); a GGUF file plans only its placement. Over-length
    texts are cut (a job must not die on one long row) and counted: in TRUNCATED_COLUMN per row when given,
    and in a warning per batch.
    """

    def __init__(
        self,
        model: str,
        quant: str | None = "auto",
        column: str = "text",
        output_column: str = "embedding",
        query: bool = False,
        task: str | None = None,
        max_length: int | None = None,
        prefer: str = "balanced",
        truncated_column: str | None = None,
        threads: int | None = None,
    ) -> None:
        from runner.pipeline import open_pipeline

        auto = quant is not None and quant.lower() == "auto"
        self.pipeline = open_pipeline(
            model,
            None if auto else quant,
            auto_quant=auto,
            max_length=max_length,
            threads=threads or _threads_for_actor(),
            hardware=HardwareOptions(prefer=prefer),
        )
        self.column, self.output_column, self.truncated_column = column, output_column, truncated_column
        self.query, self.task = query, task

    def embed(self, texts: list[str], first_index: int = 0) -> tuple[np.ndarray, list[bool]]:
        tok = self.pipeline.tokenize(texts, query=self.query, task=self.task, truncate=True, first_index=first_index)
        if tok.truncated:
            log.warning("truncated %d input(s) to %d tokens", tok.truncated, self.pipeline.max_length)
        return self.pipeline.vectors(tok), tok.cut

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise BadInput(f"no column {self.column!r} in the dataset (columns: {', '.join(batch)}); pass column=")
        vectors, cut = self.embed([str(t) for t in batch[self.column]])
        out = dict(batch)
        out[self.output_column] = vectors
        if self.truncated_column:
            out[self.truncated_column] = np.array(cut, dtype=bool)
        return out


# --- runner embed-dataset ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    index: int
    file: str
    start: int  # first row (parquet) or line (jsonl/txt) of FILE in this shard
    stop: int
    first_id: int  # the row number of the shard's first row across all inputs
    offset: int = 0  # jsonl/txt: the byte where line START begins, so a worker seeks instead of scanning


def list_inputs(inputs: list[str]) -> list[str]:
    """Input files in a stable order: globs expanded, directories walked, URIs passed through as given."""
    files: list[str] = []
    for item in inputs:
        if "://" in item:
            files.append(item)
        elif Path(item).is_dir():
            files += sorted(str(p) for p in Path(item).rglob("*") if p.suffix in INPUT_SUFFIXES)
        elif matches := sorted(glob.glob(item)):
            files += matches
        else:
            raise BadInput(f"{item}: no such input file, directory or glob match")
    bad = [f for f in files if not f.endswith(INPUT_SUFFIXES)]
    if bad:
        raise BadInput(f"{bad[0]}: not a .parquet, .jsonl or .txt file")
    if not files:
        raise BadInput(f"{' '.join(inputs)}: no input files")
    return files


def _open(path: str):
    """A seekable binary file for a local path or an object-store URI (pyarrow's filesystems, as Ray's)."""
    if "://" not in path:
        return open(path, "rb")
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    return fs.open_input_file(inner)


def line_starts(path: str, every: int) -> tuple[int, list[int]]:
    """(lines in PATH, byte offset of lines 0, EVERY, 2 x EVERY, ...): one block-wise pass, no decoding."""
    offsets, n, pos, last = [0], 0, 0, b"\n"
    with _open(path) as f:
        while block := f.read(1 << 24):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)  # vectorised: corpora are big
            # Line n + j + 1 starts after newline j; keep those that start a shard.
            ends = np.arange(n + 1, n + 1 + len(newlines))
            offsets += (pos + newlines[ends % every == 0] + 1).tolist()
            n += len(newlines)
            pos += len(block)
            last = block[-1:]
    lines = n + (last != b"\n" and pos > 0)
    return lines, offsets[: -(-lines // every)] if lines else []


def plan_shards(files: list[str], shard_rows: int) -> list[Shard]:
    """Fixed row ranges of every input, in order: the unit a worker reads, embeds and writes."""
    shards, first_id = [], 0
    for path in files:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            with _open(path) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
            offsets = [0] * -(-rows // shard_rows)
        else:
            rows, offsets = line_starts(path, shard_rows)
        for k, start in enumerate(range(0, rows, shard_rows)):
            stop = min(rows, start + shard_rows)
            shards.append(Shard(len(shards), path, start, stop, first_id + start, offsets[k]))
        first_id += rows
    return shards


def read_shard(shard: Shard, column: str, id_column: str | None) -> tuple[list[object], list[str]]:
    """(ids, texts) of SHARD's rows. Ids: ID_COLUMN's values, else the row (line) number across all inputs;
    blank lines of jsonl/txt are not rows (their numbers are skipped)."""
    ids: list[object] = []
    texts: list[str] = []
    if shard.file.endswith(".parquet"):
        import pyarrow.parquet as pq

        with _open(shard.file) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            for name, option in ((column, "--column"), (id_column, "--id-column")):
                if name and name not in names:
                    raise BadInput(f"{shard.file}: no column {name!r}; choose it with {option}")
            # Only the row groups that overlap the shard.
            groups, first, row = [], None, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if row < shard.stop and row + n > shard.start:
                    groups.append(g)
                    first = row if first is None else first
                row += n
            table = pf.read_row_groups(groups, columns=[column] + ([id_column] if id_column else []))
        part = table.slice(shard.start - (first or 0), shard.stop - shard.start)
        texts = [str(t) for t in part.column(column).to_pylist()]
        ids = (
            part.column(id_column).to_pylist()
            if id_column
            else list(range(shard.first_id, shard.first_id + len(texts)))
        )
        return ids, texts
    jsonl = shard.file.endswith(".jsonl")
    with _open(shard.file) as f:
        f.seek(shard.offset)
        for n, line in enumerate(_lines(f), shard.start):
            if n >= shard.stop:
                break
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if not text.strip():
                continue
            row_id: object = shard.first_id + n - shard.start
            if jsonl:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise BadInput(f"{shard.file}:{n + 1}: not valid JSON ({e.msg})") from None
                if isinstance(obj, str):
                    text = obj
                elif isinstance(obj, dict) and isinstance(obj.get(column), str):
                    text = obj[column]
                    if id_column:
                        if id_column not in obj:
                            raise BadInput(f"{shard.file}:{n + 1}: no field {id_column!r}; choose it with --id-column")
                        row_id = obj[id_column]
                else:
                    raise BadInput(f"{shard.file}:{n + 1}: no string field {column!r}; choose it with --column")
            ids.append(row_id)
            texts.append(text)
    return ids, texts


def _lines(f) -> Iterator[bytes]:
    rest = b""
    while block := f.read(1 << 20):
        rest += block
        *lines, rest = rest.split(b"\n")
        yield from lines
    if rest:
        yield rest


def shard_path(output_dir: str, index: int) -> str:
    return f"{output_dir.rstrip('/')}/part-{index:05d}.parquet"


def _exists(path: str) -> bool:
    if "://" not in path:
        return Path(path).is_file()
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    return fs.get_file_info(inner).type == pyarrow.fs.FileType.File


def _write_table(table, path: str) -> None:
    """Write TABLE to PATH so that a crash never leaves a file that looks complete (temp name, then rename)."""
    import pyarrow.fs
    import pyarrow.parquet as pq

    fs, inner = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)
    tmp = f"{inner}.partial-{os.getpid()}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, inner)


class ShardWriter(RayEmbedder):
    """One actor call = one shard: read its rows, embed them, write `part-NNNNN.parquet`, report counts."""

    def __init__(self, output_dir: str, column: str, id_column: str | None, **kwargs) -> None:
        super().__init__(column=column, **kwargs)
        self.output_dir, self.id_column = output_dir, id_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pyarrow as pa

        rows, cut_counts = [], []
        for k in range(len(batch["index"])):
            fields = {f: batch[f][k] for f in ("index", "file", "start", "stop", "first_id", "offset")}
            shard = Shard(**{f: v.item() if isinstance(v, np.generic) else v for f, v in fields.items()})
            ids, texts = read_shard(shard, self.column, self.id_column)
            vectors, cut = self.embed(texts, first_index=shard.first_id) if texts else (np.zeros((0, 0)), [])
            dims = self.pipeline.dims
            values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
            table = pa.table(
                {
                    "id": pa.array(ids),
                    "embedding": pa.FixedSizeListArray.from_arrays(values, dims),
                    "truncated": pa.array(cut, pa.bool_()),
                }
            )
            _write_table(table, shard_path(self.output_dir, shard.index))
            rows.append(len(texts))
            cut_counts.append(sum(cut))
        return {"index": batch["index"], "rows": np.array(rows), "truncated": np.array(cut_counts)}


@dataclass
class DatasetSummary:
    shards: int
    skipped_shards: int
    rows: int
    truncated: int
    seconds: float


def embed_dataset(
    inputs: list[str],
    output_dir: str,
    model: str,
    quant: str | None = "auto",
    *,
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    column: str = "text",
    id_column: str | None = None,
    shard_rows: int = 10_000,
    query: bool = False,
    task: str | None = None,
    max_length: int | None = None,
    hardware: HardwareOptions | None = None,
    progress: bool = False,
) -> DatasetSummary:
    """Embed every row of INPUTS into parquet shards under OUTPUT_DIR with WORKERS Ray actors; resumable."""
    import ray

    from planner import plan_for
    from runner.model import resolve_model

    if workers < 1 or shard_rows < 1:
        raise BadInput("--workers and --shard-rows must be at least 1")
    started = time.perf_counter()
    files = list_inputs(inputs)
    # Produce the GGUF once, here, before any worker starts (planned with HARDWARE: say --vram for the
    # workers' GPUs when this machine has none); workers only load it and plan its placement.
    auto = quant is not None and quant.lower() == "auto"
    if Path(model).is_file():
        gguf = model
    else:
        chosen = plan_for(model, None, max_length, hardware).chosen.quant if auto else quant
        gguf = str(resolve_model(model, chosen).path)
    shards = plan_shards(files, shard_rows)
    if "://" not in output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for stale in Path(output_dir).glob("part-*.parquet.partial-*"):  # left by a killed actor
            stale.unlink(missing_ok=True)
    todo = [s for s in shards if not _exists(shard_path(output_dir, s.index))]
    summary = DatasetSummary(len(shards), len(shards) - len(todo), 0, 0, 0.0)
    if todo:
        if not ray.is_initialized():
            ray.init(address=None if address in (None, "local") else address, log_to_driver=False)
        items = [dataclasses.asdict(s) for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardWriter,
            fn_constructor_kwargs=dict(
                output_dir=output_dir,
                column=column,
                id_column=id_column,
                model=gguf,
                quant="auto",
                query=query,
                task=task,
                max_length=max_length,
            ),  # fmt: skip
            batch_size=1,
            concurrency=workers,
            # Ray Data restarts a killed actor and retries its task by default (max_restarts and
            # max_task_retries -1): the shard is done again, written atomically, so exactly once.
            num_gpus=gpus_per_worker or None,
            num_cpus=None if gpus_per_worker else 1,
        )
        from tqdm import tqdm

        with tqdm(total=sum(s.stop - s.start for s in todo), unit="row", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None):
                done = int(np.sum(batch["rows"]))
                summary.rows += done
                summary.truncated += int(np.sum(batch["truncated"]))
                bar.update(done)
    summary.seconds = time.perf_counter() - started
    return summary
