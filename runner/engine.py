"""llama.cpp embedding engine on the low-level API: sequences decoded in micro-batches, vectors straight to numpy.

Non-causal models attend over the whole micro-batch, so every sequence must fit inside one
micro-batch (llama.cpp aborts the process otherwise); the context is sized from the longest
sequence it will be sent (planner.batching), and grown before a longer one is decoded.

On the CPU each sequence is decoded alone (its own micro-batch), so a text's vector never depends on what else
was embedded with it: llama.cpp's CPU flash attention walks the keys in 64-key tiles counted from the start of
the micro-batch, so a text packed at another offset gets an attention output 1 ulp off, and a quantized matmul
(activations rounded to 8 bits per block) turns that into differences of 1e-4 (cosine 0.9998 at Q8_0).
`packed=True` packs several sequences per micro-batch instead: faster for short texts, batch-dependent.
"""

from __future__ import annotations

import ctypes
import logging
import unicodedata
from pathlib import Path

import llama_cpp
import numpy as np

from planner.batching import MIN_TOKEN_BUDGET, max_seqs, pack, token_budget
from planner.hardware import usable_cores
from quantize import gguf_keys, llamacpp
from quantize.errors import BadInput, CorruptModelFile, EngineError, OutOfMemory
from quantize.gguf_check import check_gguf, plain_file_name
from runner.latent_attention import LatentAttentionHead

log = logging.getLogger("runner")


class Engine:
    """One GGUF model in llama.cpp's embedding mode, with the model's own pooling."""

    def __init__(
        self,
        path: Path,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        tensor_split: list[float] | None = None,
        packed: bool | None = None,
    ) -> None:
        """PACKED: several sequences per micro-batch (None: only with GPU layers, which need wide batches)."""
        llamacpp.init()
        self.packed = n_gpu_layers > 0 if packed is None else packed
        self.path = Path(path)
        self.n_threads = llamacpp.thread_count(n_threads, usable_cores())
        # llama.cpp trusts a GGUF's hyper-parameters (a bad one aborts the process): check them first.
        check_gguf(self.path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if tensor_split:
            # llama.cpp reads LLAMA_MAX_DEVICES floats: each GPU's share of the offloaded layers.
            self._split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*tensor_split)
            params.tensor_split = self._split
        if llamacpp.has_amx_kernels():
            # ggml's AMX matmul crashed here on quantized models; keep the other CPU kernels.
            log.warning(
                "this llama-cpp-python build has AMX kernels, which crash on quantized models; "
                "extra CPU buffer types are off (slower). Reinstall with scripts/install for full speed."
            )
            params.use_extra_bufts = False
        self._ctx = None
        self._budget = 0
        # Set before the first embed to see every tensor llama.cpp computes (quantize.imatrix collects with it).
        self.eval_callback: llama_cpp.ggml_backend_sched_eval_callback | None = None
        # Set before the first embed to force causal (True) or bidirectional (False) attention; None: the GGUF's.
        # quantize.imatrix's causal-chunk collection runs an embedder as llama-imatrix runs an LM.
        self.causal: bool | None = None
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            why = llamacpp.last_error()
            if n_gpu_layers > 0:  # the file was readable (resolved before); most likely the GPU is full
                raise OutOfMemory(f"{self.path}: llama.cpp could not load it with {n_gpu_layers} GPU layers ({why})")
            raise CorruptModelFile(f"{self.path}: llama.cpp could not load this GGUF ({why})")
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.n_embd = llama_cpp.llama_model_n_embd(self._model)
            self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            self._hf_tokenizer = self._load_hf_tokenizer()
            self._normalizer = self.meta(gguf_keys.NORMALIZER)
            if self._normalizer not in (None, "NFC"):
                raise CorruptModelFile(f"{self.path}: unknown {gguf_keys.NORMALIZER} {self._normalizer[:40]!r}")
            self._head = self._load_head()
        except BaseException:
            self.close()  # a bad head or tokenizer must not leak the loaded weights
            raise

    def meta(self, key: str) -> str | None:
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def _load_hf_tokenizer(self):
        """The HF tokenizer carried in the GGUF, for vocabularies llama.cpp does not tokenize exactly."""
        if self.meta(gguf_keys.TOKENIZER) != "huggingface":
            return None
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(self.meta("tokenizer.huggingface.json") or "")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a parse error, or a panic in the Rust library (not an Exception subclass)
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise CorruptModelFile(f"{self.path}: its tokenizer.huggingface.json is not a tokenizer ({why})") from None
        tok.no_truncation()  # we truncate ourselves, keeping the closing special token
        tok.no_padding()
        return tok

    def _load_head(self) -> LatentAttentionHead | None:
        """NV-Embed's pooling head, from the sidecar file the trunk names (checked against its sha256)."""
        if self.meta(gguf_keys.POOLING) != "latent-attention":
            return None
        name = self.meta(gguf_keys.HEAD_FILE)
        if not name:
            raise CorruptModelFile(f"{self.path}: latent-attention pooling but no head file recorded; re-convert")
        # Only ever a file beside the model: a name with a directory part would load a GGUF from anywhere.
        name = plain_file_name(name, str(self.path), gguf_keys.HEAD_FILE)
        head = LatentAttentionHead(self.path.parent / name, self.meta(gguf_keys.HEAD_SHA256), self.path)
        if head.hidden != self.n_embd:
            raise CorruptModelFile(f"{self.path}: its pooling head {name} is {head.hidden} wide, not {self.n_embd}")
        return head

    def flag(self, key: str) -> bool:
        return self.meta(key) == "true"

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> np.ndarray:
        """Token ids as the model's tokenizer gives them; SPECIAL adds BOS/EOS as the tokenizer does."""
        if self._hf_tokenizer is not None:
            return np.array(self._hf_tokenizer.encode(text, add_special_tokens=special).ids, dtype=np.int32)
        if self._normalizer:  # the HF tokenizer normalises before it splits; llama.cpp's does not
            text = unicodedata.normalize(self._normalizer, text)
        data = text.encode("utf-8")
        n_max = len(data) + 16
        while True:
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, special, True)
            if n >= 0:
                return np.ctypeslib.as_array(buf)[:n].copy()
            n_max = -n

    @property
    def eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self._vocab))

    @property
    def bos(self) -> int | None:
        """The BOS token where the vocabulary adds one at the start of a text, else None."""
        return int(llama_cpp.llama_vocab_bos(self._vocab)) if llama_cpp.llama_vocab_get_add_bos(self._vocab) else None

    @property
    def ends_with_special(self) -> bool:
        """Whether tokenize() appends a closing special token (EOS/SEP) that truncation must keep."""
        return bool(llama_cpp.llama_vocab_get_add_eos(self._vocab) or llama_cpp.llama_vocab_get_add_sep(self._vocab))

    # --- embedding ----------------------------------------------------------------------------
    def embed_tokens(self, seqs: list[np.ndarray], skips: list[int] | None = None, first_index: int = 0) -> np.ndarray:
        """Pooled vectors (float32, not normalised) for each token sequence, in input order.

        SKIPS: for latent-attention pooling, how many leading positions of each sequence leave the mean.
        Errors name inputs from FIRST_INDEX + 1 (the caller's numbering).
        """
        out = np.empty((len(seqs), self.n_embd), dtype=np.float32)
        if not seqs:
            return out
        lengths = [len(s) for s in seqs]
        if min(lengths) == 0:
            raise BadInput(f"input {first_index + lengths.index(0) + 1}: no tokens to embed")
        self._ensure_context(max(lengths))
        for batch in pack(lengths, self._budget, self._max_seqs if self.packed else 1):
            self._decode(seqs, batch, out, skips, first_index)
        return out

    def reserve(self, tokens: int) -> None:
        """Create the context for sequences up to TOKENS long now, so a lack of memory shows at once."""
        self._ensure_context(tokens)

    def _ensure_context(self, tokens: int) -> None:
        """A context whose token budget holds sequences of TOKENS (planner.batching.token_budget)."""
        budget = token_budget(tokens)
        if self._ctx is not None and budget <= self._budget:
            return
        self._free_context()
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        if llamacpp.embeddings_only():  # the engine scripts/install builds: no logits buffer, no LM head
            params.embeddings_only = True
        params.n_ctx = params.n_batch = params.n_ubatch = budget
        self._max_seqs = params.n_seq_max = max_seqs(budget)
        # Some graphs (llama-embed) keep a KV cache; one cache shared by all sequences, cleared per decode.
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = self.n_threads
        if self.eval_callback is not None:
            params.cb_eval = self.eval_callback
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise OutOfMemory(
                f"{self.path}: llama.cpp could not create a context of {budget} tokens "
                f"({llamacpp.last_error()}); lower --max-length"
            )
        if self.causal is not None:
            llama_cpp.llama_set_causal_attn(self._ctx, self.causal)
        self._budget = budget
        # One batch, backed by numpy arrays we fill in bulk; seq_id[i] points at seq[i].
        self._tok = np.zeros(budget, np.int32)
        self._pos = np.zeros(budget, np.int32)
        self._nseq = np.ones(budget, np.int32)
        self._seq = np.zeros(budget, np.int32)
        self._outs = np.ones(budget, np.int8)
        i32p = ctypes.POINTER(ctypes.c_int32)
        base, step = self._seq.ctypes.data, self._seq.itemsize
        self._seq_ptrs = (i32p * budget)(*(ctypes.cast(base + k * step, i32p) for k in range(budget)))
        self._batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._tok.ctypes.data_as(i32p),
            embd=None,
            pos=self._pos.ctypes.data_as(i32p),
            n_seq_id=self._nseq.ctypes.data_as(i32p),
            seq_id=self._seq_ptrs,
            logits=self._outs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def _decode(
        self, seqs: list[np.ndarray], batch: list[int], out: np.ndarray, skips: list[int] | None, first_index: int
    ) -> None:
        n = 0
        for s, i in enumerate(batch):
            k = len(seqs[i])
            self._tok[n : n + k] = seqs[i]
            self._pos[n : n + k] = np.arange(k)
            self._seq[n : n + k] = s
            n += k
        self._batch.n_tokens = n
        mem = llama_cpp.llama_get_memory(self._ctx)
        if mem:
            llama_cpp.llama_memory_clear(mem, True)
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise EngineError(f"{self.path}: llama_decode failed with code {rc} ({llamacpp.last_error()})")
        if self._head is not None:
            states = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(self._ctx), shape=(n, self.n_embd))
            lengths = [len(seqs[i]) for i in batch]
            skipped = [skips[i] if skips else 0 for i in batch]
            out[batch] = self._head.pool(states, lengths, skipped, where=[first_index + i + 1 for i in batch])
            return
        for s, i in enumerate(batch):
            ptr = llama_cpp.llama_get_embeddings_seq(self._ctx, s)
            if not ptr:
                raise EngineError(f"{self.path}: no pooled embedding from llama.cpp (is pooling set in the GGUF?)")
            out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_embd,))

    def _free_context(self) -> None:
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        self._free_context()
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_engine(
    path: Path,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    tensor_split: list[float] | None = None,
    reserve_tokens: int = MIN_TOKEN_BUDGET,
    packed: bool | None = None,
) -> Engine:
    """An Engine with N_GPU_LAYERS offloaded and a context for RESERVE_TOKENS made up front.

    When llama.cpp cannot allocate the model or the context (OutOfMemory), retry with half as many GPU
    layers, down to the CPU, saying so; any other failure (a corrupt file or head) is raised at once.
    """
    while True:
        engine = None
        try:
            engine = Engine(path, n_threads, n_gpu_layers, tensor_split, packed)
            engine.reserve(reserve_tokens)
            return engine
        except OutOfMemory as e:
            if engine is not None:
                engine.close()
            if n_gpu_layers <= 0:
                raise
            fewer = n_gpu_layers // 2
            log.warning("%s; retrying with %d GPU layers%s", e, fewer, " (CPU only)" if not fewer else "")
            n_gpu_layers = fewer
        except BaseException:
            if engine is not None:
                engine.close()
            raise
