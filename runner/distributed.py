"""Scale-out with Ray Data (extra `ray`): one model per actor, every actor through the shared pipeline.

Two pieces:
- `RayEmbedder`, a callable class for `ds.map_batches` (Ray Data's pattern for batch inference: one
  stateful actor per GPU or per CPU slot, the model loaded once in `__init__`):

      ds.map_batches(RayEmbedder, fn_constructor_kwargs={"model": "all-minilm-l6-v2"}, concurrency=2,
                     num_gpus=0, batch_size=256)

- `embed_dataset`, behind `runner embed-dataset`: the input (parquet, jsonl or txt files; paths, globs or
  object-store URIs as pyarrow/Ray read them) is read once on the driver by the same reader as `runner embed`
  (runner/inputs.py: a bad row stops the job there, naming it) and cut into shards of fixed row ranges; each
  shard is read, embedded and written to `OUTPUT_DIR/part-NNNNN.parquet` (atomically) by one actor call, the
  part's metadata naming the run and the digest of the shard's input rows. A killed actor's shard is simply
  done again by its restarted replacement: every row lands exactly once.

A job locks OUTPUT_DIR and records what made it in `OUTPUT_DIR/_run.json` (the model file: its name, quant,
file name, sha256 and pooling; the options; the inputs): a rerun with the same ones writes only the shards whose
part is missing or does not verify, any other rerun is refused unless --overwrite. The GGUF is resolved
(converted or quantized if missing; a pinned model keeps its quant) once on the driver; actors get its path and
plan only its placement on their own device (Ray sets CUDA_VISIBLE_DEVICES), so they never convert at once. For
a multi-node cluster, the GGUF and OUTPUT_DIR must be at the same path on every node (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from planner import HardwareOptions
from quantize import errors as errors_module
from quantize.errors import BadInput, EngineError, UserError
from quantize.files import atomic_path, write_text_atomic
from runner.inputs import INPUT_SUFFIXES, TABLES, count_texts, line_starts, read_records

if TYPE_CHECKING:  # runner.model loads llama.cpp: the CLI imports this module without it
    from runner.model import ResolvedModel

log = logging.getLogger("runner")


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
        texts = list(batch[self.column])
        for k, text in enumerate(texts):  # a null or a number is no text: never embed its str()
            if not isinstance(text, str) or not text.strip():
                found = "blank" if isinstance(text, str) else f"{type(text).__name__} {text!r}"
                raise BadInput(f"column {self.column!r}, row {k + 1} of the batch: {found}, not a text")
        vectors, cut = self.embed(texts)
        out = dict(batch)
        out[self.output_column] = vectors
        if self.truncated_column:
            out[self.truncated_column] = np.array(cut, dtype=bool)
        return out


# --- runner embed-dataset ----------------------------------------------------------------------------------
RUN_FILE = "_run.json"  # what made OUTPUT_DIR's parts: the model file, the options, the inputs
_PART = re.compile(r"part-\d{5,}\.parquet")
_PART_TEMPS = ".part-*.parquet.partial-*"  # quantize.files.atomic_path's temp names for a part
_SHARD_KEY = b"embedrunner.shard"  # a part's parquet schema metadata: its run, shard and input digest
# Each field of RUN_FILE and the option that sets it, for the line that refuses a folder made otherwise.
_RUN_OPTIONS = {
    "model": "model file (-m/--quant)",
    "inputs": "INPUTS",
    "column": "--column",
    "id_column": "--id-column",
    "shard_rows": "--shard-rows",
    "errors": "--errors",
    "skip_empty": "--skip-empty",
    "query": "--query/--document",
    "task": "--task",
    "max_length": "--max-length",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*): (.+)")  # `quantize.errors.BadInput: a.jsonl:3: ...` in a traceback


@dataclass(frozen=True)
class Shard:
    index: int
    file: str
    start: int  # first row (parquet) or line (jsonl/txt) of FILE in this shard, from 0
    stop: int
    first_id: int  # the row number of the shard's first row across all inputs
    offset: int = 0  # jsonl/txt: the byte where line START begins, so a worker seeks instead of scanning
    digest: str = ""  # sha256 of the shard's input rows (ids and texts), once read


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
        raise BadInput(f"{bad[0]}: not a .parquet, .jsonl, .csv, .tsv or .txt file")
    if not files:
        raise BadInput(f"{' '.join(inputs)}: no input files")
    return files


def plan_shards(files: list[str], shard_rows: int) -> list[Shard]:
    """Fixed row ranges of every input, in order: the unit a worker reads, embeds and writes."""
    shards, first_id = [], 0
    for path in files:
        if path.endswith((".parquet", *TABLES)):  # read by rows, not from a line's byte offset
            rows = count_texts(path) or 0
            offsets = [0] * -(-rows // shard_rows)
        else:
            rows, offsets = line_starts(path, shard_rows)
        for k, start in enumerate(range(0, rows, shard_rows)):
            stop = min(rows, start + shard_rows)
            shards.append(Shard(len(shards), path, start, stop, first_id + start, offsets[k]))
        first_id += rows
    return shards


def read_shard(
    shard: Shard, column: str, id_column: str | None, errors: str = "strict", skip_empty: bool = False
) -> tuple[list, list[str]]:
    """(ids, texts) of SHARD's rows, read by the one input reader (runner.inputs) as `runner embed` reads them.
    Ids: ID_COLUMN's values, else the row's number across all inputs (so rows left out by SKIP_EMPTY leave gaps
    in the ids, and every vector stays named by its row)."""
    ids: list[int | str] = []
    texts: list[str] = []
    records = read_records(shard.file, column, id_column, errors=errors, start=shard.start, stop=shard.stop,
                           offset=shard.offset, option="--column", skip_empty=skip_empty)  # fmt: skip
    rows = 0
    for k, (row_id, text) in enumerate(records):
        rows += 1
        if text is not None:
            ids.append(shard.first_id + k if row_id is None else row_id)
            texts.append(text)
    if rows != shard.stop - shard.start:
        raise _changed(shard)
    return ids, texts


def _changed(shard: Shard) -> BadInput:
    return BadInput(f"{shard.file}: changed while the job ran (rows {shard.start + 1} to {shard.stop}); run it again")


def rows_digest(ids: list, texts: list[str]) -> str:
    """sha256 of a shard's input rows: what its part must record to be trusted by a rerun."""
    h = hashlib.sha256()
    for row_id, text in zip(ids, texts, strict=True):
        h.update(json.dumps([row_id, text]).encode() + b"\n")
    return h.hexdigest()


def check_inputs(
    shards: list[Shard], column: str, id_column: str | None, errors: str, progress: bool, skip_empty: bool = False
) -> list[Shard]:
    """SHARDS with their digests, every row read once here, before any worker starts: a missing column, a blank,
    null or non-string cell, bytes that are not UTF-8 or ids of mixed types are one line naming the file and the
    row, not a worker's traceback an hour into the job."""
    from tqdm import tqdm

    checked, first_id = [], None
    total = sum(s.stop - s.start for s in shards)
    with tqdm(total=total, unit="row", desc="reading inputs", disable=not progress) as bar:
        for s in shards:
            ids, texts = read_shard(s, column, id_column, errors, skip_empty)
            for k, row_id in enumerate(ids if id_column else ()):  # one id type: parts are one dataset
                if first_id is None:
                    first_id = (row_id, _where(s, 0))
                elif type(row_id) is not type(first_id[0]):
                    raise BadInput(
                        f"{_where(s, k)}: id {row_id!r} is {_kind(row_id)}, the id at {first_id[1]} "
                        f"{_kind(first_id[0])}; ids must be all integers or all strings"
                    )
            checked.append(dataclasses.replace(s, digest=rows_digest(ids, texts)))
            bar.update(s.stop - s.start)
    return checked


def _where(shard: Shard, k: int) -> str:
    n = shard.start + k + 1
    return f"{shard.file}: row {n}" if shard.file.endswith(".parquet") else f"{shard.file}:{n}"


def _kind(value: object) -> str:
    return "an integer" if isinstance(value, int) else "a string"


def run_record(files: list[str], model: ResolvedModel, **options: object) -> dict:
    """RUN_FILE's content: what a rerun into the same folder must share (the rows themselves are checked shard by
    shard, by digest). MODEL is named as in every output of runner embed (its name, quant, file and sha256)."""
    inputs = [f if "://" in f else str(Path(f).resolve()) for f in files]
    return {"model": model.identity() | {"pooling": model.pooling}, "inputs": inputs, **options}


def _run_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _show(value: object) -> str:
    if isinstance(value, dict) and "file" in value:
        return f"{value['file']} ({value.get('quant')}, sha256 {str(value.get('sha256'))[:12]})"
    if isinstance(value, list):
        return f"{len(value)} files from {value[0]}" if value else "none"
    return json.dumps(value)


def prepare_output(out: Path, record: dict, overwrite: bool) -> None:
    """Make OUT ready for the run RECORD describes; called under OUT's lock.

    A folder made by another run (another model, options or inputs) is refused naming what differs, or with
    OVERWRITE emptied of this tool's files (its parts, RUN_FILE); other files are left alone. Temp files of
    parts are removed: the lock says no writer of this folder is left.
    """
    run = out / RUN_FILE
    parts = [p for p in out.iterdir() if _PART.fullmatch(p.name)] if out.is_dir() else []
    fix = "choose a new output folder or pass --overwrite"
    if overwrite:
        for p in parts:
            p.unlink()
        run.unlink(missing_ok=True)
    elif run.exists():
        try:
            made = json.loads(run.read_text())
            made = made if isinstance(made, dict) else {}
        except (OSError, ValueError):
            raise BadInput(f"{run}: not readable as a run record; {fix}") from None
        for key, option in _RUN_OPTIONS.items():
            before, now = made.get(key), record.get(key)  # get: an option recorded only when set (--skip-empty)
            if before != now:
                raise BadInput(f"{out}: made by a run with another {option} ({_show(before)}, now {_show(now)}); {fix}")
    elif parts:
        raise BadInput(f"{out}: holds part files but no {RUN_FILE} saying what made them; {fix}")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(_PART_TEMPS):
        tmp.unlink(missing_ok=True)
    if not run.exists():
        write_text_atomic(run, json.dumps(record, indent=2) + "\n")


def shard_path(output_dir: str, index: int) -> str:
    return f"{output_dir.rstrip('/')}/part-{index:05d}.parquet"


def _shard_metadata(shard: Shard, key: str) -> dict:
    return {"run": key, "shard": shard.index, "start": shard.start, "stop": shard.stop, "digest": shard.digest}


def part_complete(path: Path, shard: Shard, key: str) -> bool:
    """Whether PATH holds SHARD's vectors from this run: it opens as parquet, its metadata names this run, this
    shard and the digest of the shard's input rows, and it has a row for each. Anything else (garbage, a file cut
    short, another run's or shard's part, a part of other input rows) is done again, never trusted."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        found = json.loads(pf.schema_arrow.metadata[_SHARD_KEY])
        return found == _shard_metadata(shard, key) and pf.metadata.num_rows == shard.stop - shard.start
    except (OSError, ValueError, KeyError, TypeError):  # pyarrow's errors are OSError and ValueError
        return False


def write_part(output_dir: str, shard: Shard, key: str, ids: list, vectors: np.ndarray, cut: list[bool]) -> None:
    """SHARD's `part-NNNNN.parquet` (id, embedding, truncated), with the metadata `part_complete` checks; written
    under a temp name, fsynced and renamed, so a part that is there is whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.table(
        {
            "id": pa.array(ids),
            "embedding": pa.FixedSizeListArray.from_arrays(values, vectors.shape[1]),
            "truncated": pa.array(cut, pa.bool_()),
        },
        metadata={_SHARD_KEY: json.dumps(_shard_metadata(shard, key))},
    )
    with atomic_path(Path(shard_path(output_dir, shard.index))) as tmp:
        pq.write_table(table, tmp)


class ShardWriter(RayEmbedder):
    """One actor call = one shard: read its rows, embed them, write `part-NNNNN.parquet`, report counts."""

    def __init__(
        self,
        output_dir: str,
        column: str,
        id_column: str | None,
        run_key: str,
        errors: str,
        skip_empty: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(column=column, **kwargs)
        self.output_dir, self.id_column, self.run_key, self.errors = output_dir, id_column, run_key, errors
        self.skip_empty = skip_empty

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, cut_counts = [], []
        for k in range(len(batch["index"])):
            fields = {f.name: batch[f.name][k] for f in dataclasses.fields(Shard)}
            shard = Shard(**{f: v.item() if isinstance(v, np.generic) else v for f, v in fields.items()})
            ids, texts = read_shard(shard, self.column, self.id_column, self.errors, self.skip_empty)
            if rows_digest(ids, texts) != shard.digest:
                raise _changed(shard)
            vectors, cut = self.embed(texts, first_index=shard.first_id)
            write_part(self.output_dir, shard, self.run_key, ids, vectors, cut)
            rows.append(len(texts))
            cut_counts.append(sum(cut))
        threads = np.full(len(rows), self.pipeline.engine.n_threads)
        return {"index": batch["index"], "rows": np.array(rows), "truncated": np.array(cut_counts), "threads": threads}


@dataclass
class DatasetSummary:
    shards: int
    skipped_shards: int
    rows: int
    truncated: int
    seconds: float
    threads: int = 0  # llama.cpp's threads in each worker
    model: ResolvedModel | None = None  # the file every row was embedded with


def embed_dataset(
    inputs: list[str],
    output_dir: str,
    model: str,
    quant: str | None = "auto",
    *,
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: int | None = None,
    column: str = "text",
    id_column: str | None = None,
    shard_rows: int = 10_000,
    errors: str = "strict",
    skip_empty: bool = False,
    query: bool = False,
    task: str | None = None,
    max_length: int | None = None,
    overwrite: bool = False,
    hardware: HardwareOptions | None = None,
    progress: bool = False,
    verbose: bool = False,
    on_plan: Callable[[str], None] | None = None,
) -> DatasetSummary:
    """Embed every row of INPUTS into parquet shards under OUTPUT_DIR with WORKERS Ray actors, each given
    CPUS_PER_WORKER cores (default: the cluster's cores shared out) as llama.cpp's threads; resumable.

    OUTPUT_DIR is locked for the job and records what made it (RUN_FILE): a rerun with the same model, options
    and inputs writes only the shards whose part is missing or does not verify; any other rerun is refused
    unless OVERWRITE. ON_PLAN hears one line (the model file, the shards, the workers) before the workers start;
    Ray's own logs reach stderr only when VERBOSE.
    """
    from runner.io import OutputLock

    if workers < 1 or shard_rows < 1 or (cpus_per_worker is not None and cpus_per_worker < 1):
        raise BadInput("--workers, --cpus-per-worker and --shard-rows must be at least 1")
    if "://" in output_dir:
        raise BadInput(f"{output_dir}: the output must be a folder on a (shared) filesystem, where each part can be "
                       "renamed into place and the folder locked")  # fmt: skip
    started = time.perf_counter()
    files = list_inputs(inputs)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{output_dir}: not a folder; OUTPUT_DIR is the folder the parts go to")
    # One job per folder, refused now, before it loads or reads anything; the lock file lives in the folder.
    with OutputLock(out / RUN_FILE, option="OUTPUT_DIR"):
        shards = check_inputs(plan_shards(files, shard_rows), column, id_column, errors, progress, skip_empty)
        resolved = _model_file(model, quant, max_length, hardware)
        options = dict(column=column, id_column=id_column, shard_rows=shard_rows, errors=errors, query=query,
                       task=task, max_length=max_length)  # fmt: skip
        options |= {"skip_empty": True} if skip_empty else {}  # absent when off: earlier folders' records still match
        record = run_record(files, resolved, **options)
        prepare_output(out, record, overwrite)
        key = _run_key(record)
        todo = [s for s in shards if not part_complete(Path(shard_path(output_dir, s.index)), s, key)]
        summary = DatasetSummary(len(shards), len(shards) - len(todo), 0, 0, 0.0, model=resolved)
        if on_plan is not None:
            done = f", {summary.skipped_shards} already complete" if summary.skipped_shards else ""
            on_plan(f"embed-dataset: {resolved.path.name} ({resolved.quant}); {len(shards)} shard(s) of up to "
                    f"{shard_rows} rows{done}; {workers} worker(s)")  # fmt: skip
        if todo:
            writer = dict(output_dir=output_dir, column=column, id_column=id_column, run_key=key, errors=errors,
                          skip_empty=skip_empty, model=str(resolved.path), quant="auto", query=query, task=task,
                          max_length=max_length)  # fmt: skip
            _run_shards(todo, writer, address, workers, gpus_per_worker, cpus_per_worker, summary, progress, verbose)
    summary.seconds = time.perf_counter() - started
    return summary


def _model_file(
    model: str, quant: str | None, max_length: int | None, hardware: HardwareOptions | None
) -> ResolvedModel:
    """The GGUF, produced once here before any worker starts (planned with HARDWARE: say --vram for the workers'
    GPUs when this machine has none); workers only load it and plan its placement. A pinned model keeps its quant
    (runner/model.py), as in runner embed."""
    from quantize.progress import Progress
    from quantize.reference import ModelRef
    from runner.model import plan_run, resolve_model

    ref = ModelRef.parse(model)
    auto = quant is not None and quant.lower() == "auto"
    progress = Progress.stderr()
    plan = plan_run(ref, None, max_length, hardware, progress) if auto else None
    return resolve_model(ref, None if auto else quant, progress=progress, plan=plan)


def _run_shards(
    todo: list[Shard],
    writer: dict,
    address: str | None,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: int | None,
    summary: DatasetSummary,
    progress: bool,
    verbose: bool = False,
) -> None:
    quiet_ray(verbose)
    import ray
    import ray.data
    from tqdm import tqdm

    if not ray.is_initialized():
        level = logging.INFO if verbose else logging.ERROR
        ray.init(address=None if address in (None, "local") else address, log_to_driver=verbose,
                 logging_level=level, configure_logging=True)  # fmt: skip
        # Ray Data's own progress bars and its per-dataset log lines: ours is the one bar.
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = verbose
        ctx.print_on_execution_start = verbose
    cpus = cpus_for_workers(workers, cpus_per_worker)
    items = [dataclasses.asdict(s) for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardWriter,
        fn_constructor_kwargs=writer | {"threads": cpus},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        # Ray Data restarts a killed actor and retries its task by default (max_restarts and
        # max_task_retries -1): the shard is done again, written atomically, so exactly once.
        num_gpus=gpus_per_worker or None,
        num_cpus=cpus,  # GPU workers too: llama.cpp's threads tokenize, batch and run the layers left on the CPU
    )
    with tqdm(total=sum(s.stop - s.start for s in todo), unit="row", disable=not progress) as bar:
        try:
            for batch in ds.iter_batches(batch_size=None):
                done = int(np.sum(batch["rows"]))
                summary.rows += done
                summary.truncated += int(np.sum(batch["truncated"]))
                summary.threads = max(summary.threads, int(np.max(batch["threads"])))
                bar.update(done)
        except Exception as e:
            raise worker_error(e) from e


def quiet_ray(verbose: bool) -> None:
    """Ray's logs off unless VERBOSE, before Ray is imported: its C++ core and Ray Data's loggers (which Ray Data
    configures again for each dataset, so by its environment variable) at errors only, worker logs deduplicated and
    not forwarded, its deprecation warnings filtered: a job's stderr is the plan line, a bar and the summary."""
    if verbose:
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # e.g. core_worker's "constructor arguments" E line
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cpus_for_workers(workers: int, asked: int | None) -> int:
    """Each worker's CPUs (llama.cpp's threads): ASKED, else the Ray cluster's cores shared out among WORKERS, at
    most one node's. More than any node has is refused: Ray would wait for such a node forever."""
    import ray

    nodes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, default=1)
    if asked is not None and asked > largest:
        raise BadInput(f"--cpus-per-worker {asked}: no node of the Ray cluster has that many CPUs (at most {largest})")
    return asked or max(1, min(sum(nodes) // workers, largest))


def worker_error(e: BaseException) -> UserError:
    """A failed job as one line: the worker's own error (a BadInput naming the file and row, a CorruptModelFile...)
    taken out of Ray's wrappers. Ray keeps it as `.cause` for a plain task, but Ray Data passes on only its
    traceback text (`UserCodeException`, `ActorDiedError`): then the first exception line that is not Ray's is
    the worker's, and an error type of ours is raised again as itself."""
    from ray.exceptions import RayTaskError

    chain: list[BaseException] = []
    while e is not None and e not in chain:
        if isinstance(e, UserError) and not isinstance(e, RayTaskError):
            return e
        chain.append(e)
        e = e.cause if isinstance(e, RayTaskError) else e.__cause__
    e = chain[-1]
    lines = [line for c in chain for line in _ANSI.sub("", str(c)).splitlines() if line.strip()]
    # Unindented lines only: a traceback's source lines are indented, its exception lines are not.
    raised = [m for m in map(_EXCEPTION_LINE.match, lines) if m and not m.group(1).startswith("ray.")]
    name, message = (raised[0].group(1).rsplit(".", 1)[-1], raised[0].group(2)) if raised else (
        type(e).__name__, lines[-1].strip() if lines else "no message")  # fmt: skip
    ours = getattr(errors_module, name, None)
    if isinstance(ours, type) and issubclass(ours, UserError):
        return ours(message)
    return EngineError(f"a worker failed: {name}: {message} (runner --debug embed-dataset ... shows the traceback)")
