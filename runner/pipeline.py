"""The one embedding pipeline: texts -> prompt -> tokens -> truncation -> engine -> pooled vectors -> norm.

Every front door goes through it: `runner embed` and `Embedder.encode` stream texts through `stream`,
`runner serve` tokenizes each request with `tokenize` and batches them across requests with `vectors`.
`open_pipeline` is the one way from a model name to a loaded pipeline: plan (optional), produce the GGUF
if missing, load with the plan's GPU layers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from planner import HardwareOptions, Plan
from planner.batching import MAX_SEQS_PER_DECODE, MIN_TOKEN_BUDGET, token_budget
from planner.policy import max_length_for
from quantize import gguf_keys
from quantize.errors import BadInput, CorruptModelFile
from quantize.progress import Progress
from quantize.reference import ModelRef
from runner import compact
from runner.engine import Engine, open_engine
from runner.model import ResolvedModel, plan_run, resolve_model

log = logging.getLogger("runner")

# A text is tokenized a prefix at a time once it is longer than this many characters per token it may keep (plus
# HEAD_MARGIN tokens, so that the tokens a cut changes fall past the ones kept).
HEAD_CHARS_PER_TOKEN = 8
HEAD_MARGIN = 64
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # valid in JSON ("\ud800"), never in UTF-8 text


@dataclass
class Stats:
    """Counts over a run (its summary line)."""

    texts: int = 0  # embedded now
    tokens: int = 0
    truncated: int = 0
    skipped: int = 0  # already on disk from an interrupted run


@dataclass
class Tokenized:
    """Token sequences ready for the engine: already prompted, EOS-appended and truncated."""

    seqs: list[np.ndarray] = field(default_factory=list)
    skips: list[int] = field(default_factory=list)  # leading positions left out of the mean (NV-Embed)
    cut: list[bool] = field(default_factory=list)  # which inputs were truncated

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def truncated(self) -> int:
        """How many inputs were cut."""
        return sum(self.cut)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    @staticmethod
    def concat(parts: Sequence[Tokenized]) -> Tokenized:
        """One batch from several (requests of a server): rows keep their order, part after part."""
        return Tokenized(
            [s for p in parts for s in p.seqs], [k for p in parts for k in p.skips], [c for p in parts for c in p.cut]
        )


@dataclass(frozen=True)
class Chunk:
    """Consecutive texts of a stream and their vectors."""

    index: int  # 0, 1, ... in stream order
    first: int  # 0-based input number of its first text
    count: int
    digest: str  # sha256 over the run's key and every text up to and including this chunk
    vectors: np.ndarray | None  # None: SKIP said this chunk is already done (resume)


class Pipeline:
    """A loaded model with its prompts and its truncation limit: texts in, float32 vectors out."""

    def __init__(
        self,
        engine: Engine,
        model: ResolvedModel | None = None,
        max_length: int | None = None,
        plan: Plan | None = None,
    ) -> None:
        self.engine = engine
        self.model = model or ResolvedModel.of_file(engine.path)
        self.plan = plan
        # The plan's length when there is one (the memory was sized for it), else the same rule the planner uses.
        asked = plan.settings.max_length if plan is not None and max_length is None else max_length
        self.max_length = max_length_for(asked, self.model.max_length, engine.n_ctx_train)
        self._append_eos = engine.flag(gguf_keys.APPEND_EOS)
        self._skip_instruction = engine.flag(gguf_keys.POOL_SKIP_INSTRUCTION)
        self.matryoshka_dims = compact.parse_dims(engine.meta(gguf_keys.MATRYOSHKA_DIMS), engine.n_embd, engine.path)

    @property
    def dims(self) -> int:
        return self.engine.n_embd

    @property
    def vocab_size(self) -> int:
        return self.engine.n_vocab

    def check_dimensions(self, dimensions: int | None) -> int | None:
        """DIMENSIONS if this model can be cut to it (None: full width), else a BadInput saying why not."""
        return compact.check_dimensions(dimensions, self.dims, self.matryoshka_dims, self.model.name)

    # --- one batch ----------------------------------------------------------------------------
    def tokenize(
        self,
        texts: Sequence[str],
        *,
        query: bool = False,
        task: str | None = None,
        truncate: bool = True,
        first_index: int = 0,
    ) -> Tokenized:
        """TEXTS through the model's prompt template and tokenizer, cut at max_length.

        A text that is not a string, empty, not valid Unicode (a lone surrogate), or over the limit with
        TRUNCATE=False is a BadInput naming the input (numbered from FIRST_INDEX + 1).
        """
        engine = self.engine
        # NV-Embed: each text is `instruction + text + eos_token` and its mean leaves out the first
        # len(tokenize(instruction)) positions (counted without BOS, zeroed from position 0: BOS included).
        skip = 0
        if self._skip_instruction and texts:
            instruction = self.model.prompts.instruction(query, task, where=engine.path.name)
            skip = len(engine.tokenize(instruction, special=False)) if instruction else 0
        out = Tokenized()
        for i, text in enumerate(texts, first_index + 1):
            if not isinstance(text, str):
                raise BadInput(f"input {i}: {type(text).__name__}, not a text; send strings")
            if not text or text.isspace():  # no copy of a long text
                raise BadInput(f"input {i}: empty text; remove empty lines from the input")
            if surrogate := _LONE_SURROGATE.search(text):
                raise BadInput(
                    f"input {i}: not valid Unicode: a lone surrogate ({surrogate[0]!r}) at character "
                    f"{surrogate.start()}; send UTF-8 text"
                )
            tokens, whole = self._head_tokens(self.model.prompts.apply(text, query, task, where=f"input {i}"))
            if self._append_eos:
                tokens = np.append(tokens, np.int32(engine.eos))
            # Keep a closing EOS/SEP the tokenizer adds; an EOS that is part of the text (NV-Embed) goes
            # with the rest of the tail, as the reference's truncation does.
            keep_last = engine.ends_with_special and not self._append_eos
            self._add(out, tokens, skip, i, truncate, keep_last, whole)
        return out

    def _head_tokens(self, text: str) -> tuple[np.ndarray, bool]:
        """TEXT's tokens, exactly those of the whole text up to max_length (and its closing special token, which
        does not depend on the text), and whether they are all of them.

        A text far longer than max_length is not tokenized whole (a 50 MB line cost gigabytes): prefixes of
        HEAD_CHARS_PER_TOKEN characters per token of max_length + HEAD_MARGIN are, doubled until two of them give
        over that many tokens and agree on the first max_length (a cut only changes the tokens near it).
        """
        want = self.max_length + HEAD_MARGIN
        size = want * HEAD_CHARS_PER_TOKEN
        before = None
        while size < len(text):
            tokens = self.engine.tokenize(text[:size])
            if len(tokens) > want:
                if before is not None and np.array_equal(before[: self.max_length], tokens[: self.max_length]):
                    return tokens, False
                before = tokens
            size *= 2
        return self.engine.tokenize(text), True

    def from_token_ids(self, ids: Sequence[Sequence[int]], *, truncate: bool = True, first_index: int = 0) -> Tokenized:
        """Token ids given by the caller (OpenAI's array-of-token-ids input), checked and cut at max_length."""
        out = Tokenized()
        for i, seq in enumerate(ids, first_index + 1):
            if isinstance(seq, np.ndarray):
                seq = seq.tolist() if seq.ndim == 1 and np.issubdtype(seq.dtype, np.integer) else None
            # Checked as Python ints: a 5,000-digit one is out of range, not an overflow.
            if not isinstance(seq, (list, tuple)) or not seq or not all(_is_int(t) for t in seq):
                raise BadInput(f"input {i}: token ids must be a non-empty list of integers")
            if min(seq) < 0 or max(seq) >= self.vocab_size:
                raise BadInput(f"input {i}: token id out of range; the vocabulary has {self.vocab_size} tokens")
            self._add(out, np.array(seq, dtype=np.int32), 0, i, truncate, keep_last=False, whole=True)
        return out

    def _add(
        self, out: Tokenized, tokens: np.ndarray, skip: int, i: int, truncate: bool, keep_last: bool, whole: bool
    ) -> None:
        """Append TOKENS to OUT, cut at max_length (or refused, naming input I, when TRUNCATE is False). WHOLE:
        TOKENS are all of the input's, not the head of a longer text."""
        limit = self.max_length
        cut = len(tokens) > limit
        if cut:
            if not truncate:
                count = f"{len(tokens)} tokens" if whole else f"more than {limit} tokens"
                raise BadInput(f"input {i}: {count}, over the limit of {limit}; shorten it, or allow truncation")
            tokens = np.concatenate([tokens[: limit - 1], tokens[-1:]]) if keep_last else tokens[:limit]
        out.cut.append(cut)
        out.seqs.append(tokens)
        out.skips.append(skip)

    def vectors(
        self, tokenized: Tokenized, *, normalize: bool = True, first_index: int = 0, dimensions: int | None = None
    ) -> np.ndarray:
        """One float32 row per sequence, in order; cut to its first DIMENSIONS (Matryoshka models), then
        L2-normalised unless NORMALIZE is False."""
        dimensions = self.check_dimensions(dimensions)
        vectors = self.engine.embed_tokens(tokenized.seqs, skips=tokenized.skips, first_index=first_index)
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():  # corrupt weights: a NaN row is no vector, and NaN is not even valid JSON
            raise CorruptModelFile(
                f"input {first_index + int(bad.argmax()) + 1}: {self.engine.path} gave a non-finite vector "
                "(NaN or infinity); its weights are likely corrupt: check it with `runner verify`"
            )
        vectors = compact.truncate(vectors, dimensions)
        if normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= np.maximum(norms, 1e-12)
        return vectors

    def embed(
        self,
        texts: Sequence[str],
        *,
        query: bool = False,
        task: str | None = None,
        normalize: bool = True,
        truncate: bool = True,
        first_index: int = 0,
        stats: Stats | None = None,
        dimensions: int | None = None,
    ) -> np.ndarray:
        """tokenize + vectors. Cut inputs are counted in STATS, or warned about when there is none."""
        tok = self.tokenize(texts, query=query, task=task, truncate=truncate, first_index=first_index)
        if stats is not None:
            stats.texts += len(tok)
            stats.tokens += tok.tokens
            stats.truncated += tok.truncated
        elif tok.truncated:
            log.warning("truncated %d input(s) to %d tokens", tok.truncated, self.max_length)
        return self.vectors(tok, normalize=normalize, first_index=first_index, dimensions=dimensions)

    # --- a stream -----------------------------------------------------------------------------
    def stream(
        self,
        texts: Iterable[str],
        chunk_size: int,
        *,
        run_key: str = "",
        part_seconds: float = math.inf,
        resumed: Callable[[int], int | None] | None = None,
        skip: Callable[[int, str, int], bool] | None = None,
        stats: Stats | None = None,
        on_step: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        **options,
    ) -> Iterator[Chunk]:
        """Texts in, chunks of vectors out, reading TEXTS lazily (memory stays flat for any input).

        Texts are embedded one engine micro-batch at a time (as many as fill its token budget), and ON_STEP(texts)
        follows each, so a progress bar moves per micro-batch. A chunk ends at CHUNK_SIZE texts or once
        PART_SECONDS of embedding have gone into it (by CLOCK), whichever comes first, so a run of any size and
        speed keeps its work often.

        Each chunk's digest covers RUN_KEY and every text so far, so a resumed run can tell whether the part an
        interrupted run left is the same work: RESUMED(index) is how many texts that part holds (None: no part),
        and SKIP(index, digest, count) true means it is whole and the same texts, so they are not embedded again.
        OPTIONS go to `tokenize` (query, task, truncate) and `vectors` (normalize, dimensions).
        """
        if chunk_size < 1:
            raise BadInput(f"chunk size {chunk_size}: must be at least 1")
        tokenize = {k: options.pop(k) for k in ("query", "task", "truncate") if k in options}
        budget = token_budget(self.max_length)  # one micro-batch of the engine (runner.engine packs by it)
        running = hashlib.sha256(run_key.encode())
        it = iter(texts)
        first, index = 0, 0
        pending: tuple[str, Tokenized] | None = None  # read, but over the last micro-batch's budget

        def digest(batch: list) -> str:
            for t in batch:
                # Not a text: tokenize refuses it, naming it (its repr could be gigabytes, or recurse 100,000 deep).
                running.update(t.encode("utf-8", "surrogatepass") if isinstance(t, str) else type(t).__name__.encode())
                running.update(b"\0")
            return running.hexdigest()

        while True:
            left = resumed(index) if resumed is not None and pending is None else None
            if left is not None:  # the interrupted run's part: the same texts again, unless it is damaged
                batch = list(islice(it, left))
                if not batch:
                    return
                sha = digest(batch)
                vectors = None
                if skip is not None and skip(index, sha, len(batch)):
                    if stats is not None:
                        stats.skipped += len(batch)
                else:
                    vectors = self.embed(batch, first_index=first, stats=stats, **tokenize, **options)
                if on_step is not None:
                    on_step(len(batch))
                yield Chunk(index, first, len(batch), sha, vectors)
                first += len(batch)
                index += 1
                continue
            started, done, parts, sha = clock(), 0, [], ""
            while done < chunk_size and (not parts or clock() - started < part_seconds):
                step, tok = [], Tokenized()
                while done + len(tok) < chunk_size and len(tok) < MAX_SEQS_PER_DECODE:
                    if pending is None:
                        if not (text := list(islice(it, 1))):
                            break
                        pending = (text[0], self.tokenize(text, first_index=first + done + len(tok), **tokenize))
                    if tok and tok.tokens + pending[1].tokens > budget:
                        break  # the next micro-batch's
                    step.append(pending[0])
                    more = pending[1]
                    tok.seqs += more.seqs
                    tok.skips += more.skips
                    tok.cut += more.cut
                    pending = None
                if not tok:
                    break
                sha = digest(step)
                if stats is not None:
                    stats.texts += len(tok)
                    stats.tokens += tok.tokens
                    stats.truncated += tok.truncated
                parts.append(self.vectors(tok, first_index=first + done, **options))
                done += len(tok)
                if on_step is not None:
                    on_step(len(tok))
            if not parts:
                return
            yield Chunk(index, first, done, sha, np.concatenate(parts))
            first += done
            index += 1

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pipeline(
    model: str | ModelRef,
    quant: str | None = None,
    *,
    auto_quant: bool = False,
    max_length: int | None = None,
    threads: int | None = None,
    hardware: HardwareOptions | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    keep_f16: bool = True,
    progress: Progress | None = None,
    packed: bool | None = None,
) -> Pipeline:
    """MODEL (quantize.reference.ModelRef: a GGUF file, a model directory, an HF checkpoint directory, a registry
    name or a hub repo id) loaded and ready.

    AUTO_QUANT plans the quant and GPU layers for this machine (runner.model.plan_run: a pinned model keeps its
    quant; ON_PLAN sees the plan before any conversion starts) and claims the planned context up front, so a lack
    of memory shows (and is retried with fewer GPU layers) now rather than mid-run. runner.model.resolve_model
    produces the GGUF if missing, after the disk check, and pins it (PROGRESS and KEEP_F16 are its). PACKED: the
    engine's micro-batches (runner.engine.Engine: None packs only with GPU layers).
    """
    if max_length is not None and max_length < 1:
        raise BadInput(f"--max-length {max_length}: must be at least 1")
    ref = ModelRef.parse(model)
    plan, gpu_layers, split = None, 0, None
    progress = Progress.stderr() if progress is None else progress
    if auto_quant:
        plan = plan_run(ref, quant, max_length, hardware or HardwareOptions(), progress)
        if on_plan is not None:
            on_plan(plan)
        gpu_layers, split = plan.chosen.n_gpu_layers, plan.tensor_split
    resolved = resolve_model(ref, quant, keep_f16, progress, plan)
    reserve = plan.settings.max_length if plan is not None else MIN_TOKEN_BUDGET
    engine = open_engine(resolved.path, threads, gpu_layers, split, reserve, packed)
    try:
        return Pipeline(engine, resolved, max_length, plan)
    except BaseException:
        engine.close()
        raise


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
