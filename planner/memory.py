"""Bytes a run needs on each device: a pure function of (shapes, quant, settings, GPU layers).

What llama.cpp allocates for an embedding context (sizes it logs, checked in tests/test_plan.py):
- weights: each repeating layer on the device that runs it; the token embedding stays in RAM;
- KV cache (llama-embed keeps one, BERT none): n_ctx x layers x 2 x kv_heads x head_dim x f16;
- compute buffer with flash attention (what `auto` picks on CPU and on CUDA for these head sizes):
  4 bytes x n_ubatch x (3 x ffn + 3 x hidden + query width) for the largest layer's activations, plus
  4 x n_ubatch x n_seq for mean pooling's averaging matrix, plus the f16 attention mask, 2 bytes x
  n_ubatch^2. Fitted to llama.cpp's reports for SmolLM2 and a Mistral-7B-shaped layer at n_ubatch
  256..4096 (within 3 %) and for the tiny nemotron, NV-Embed, Qwen3 and gte-Qwen2 models at 512 and 4096
  (within 2 %; tests/test_engine_patch.py); 8 % over for Qwen3-8B's layer (bench.lm_head). Without flash
  attention the scores alone take 4 x heads x n_ubatch^2 bytes;
- output buffer (host): in embedding mode every token of a decode is an output, 4 x n x hidden bytes for
  a decode of n tokens, cleared (so resident) when it grows; the engine packs decodes up to n_ubatch tokens;
- logits, which an embedder never reads, only on a stock engine (Settings.embeddings_only False): a stock
  llama.cpp 0.3.36 sizes the output buffer for logits too (`output_reserve`: has_logits is always true),
  4 x n x vocab more (1 GiB at n_ubatch 2048 for Llama-3's 128k vocabulary), and its qwen2/qwen3 graphs
  apply the LM head (the tied token embedding) to every token, after the layers, whose activations are
  freed by then: the compute buffer is the larger of the layers' and the head's, 4 bytes x n_ubatch x vocab
  of logits beside the mask and two n_ubatch x hidden states (2.4 GiB at n_ubatch 4096 for Qwen's 151k
  vocabulary; within 1.3 % of llama.cpp at 512 and 4096 for the tiny Qwen models and Qwen3-8B's layer). On
  the CPU when no layer is offloaded; else on the first GPU, where ggml's scheduler offloads a large matmul
  whose weights sit in RAM (an estimate to confirm on a GPU). The engine scripts/install builds
  (scripts/engine-patches/embeddings-only.patch) has neither;
- llama.cpp's vocabulary structures: ~400 bytes per token (measured: 56 MiB for Llama-3's);
- on each GPU, the CUDA context and cuBLAS workspace (CUDA_OVERHEAD, an estimate to confirm on a GPU);
- in RAM, the Python process with llama.cpp loaded (RUNTIME, measured: 83 MiB) and NV-Embed's head.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.batching import max_seqs, token_budget
from planner.shapes import ModelShape
from quantize.sizes import file_bytes, layer_bytes

MIB = 2**20
RUNTIME = 90 * MIB  # python + numpy + click + llama.cpp, before any model (83 MiB measured)
VOCAB_BYTES_PER_TOKEN = 400
LOGITS_ARCHS = ("qwen2", "qwen3")  # graphs that compute logits in embedding mode too, on a stock engine
CUDA_OVERHEAD = 512 * MIB
HEAD_STEP_ROWS = 512  # runner/latent_attention.py ROWS_PER_STEP


@dataclass(frozen=True)
class Settings:
    max_length: int  # the longest sequence a micro-batch must hold
    embeddings_only: bool = False  # the engine keeps no logits in embedding mode (Hardware.embeddings_only)

    @property
    def ubatch(self) -> int:
        return token_budget(self.max_length)

    @property
    def n_seq(self) -> int:
        return max_seqs(self.ubatch)


@dataclass(frozen=True)
class DeviceNeeds:
    """Bytes on one device, by what holds them (Ollama's MemoryEstimate keeps the same breakdown)."""

    device: str  # "GPU0", "GPU1", ... or "CPU"
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    output: int = 0  # the host buffer llama.cpp returns states through
    head: int = 0  # a pooling head the runner holds (NV-Embed)
    overhead: int = 0  # CUDA context on a GPU; the process and llama.cpp's vocabulary in RAM

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.output + self.head + self.overhead

    def as_json(self) -> dict:
        return {
            "device": self.device,
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "output": self.output,
            "head": self.head,
            "overhead": self.overhead,
            "total": self.total,
        }


@dataclass(frozen=True)
class Needs:
    gpus: tuple[DeviceNeeds, ...]  # one per GPU the plan may use, in order
    cpu: DeviceNeeds
    file: int  # the GGUF's size on disk

    @property
    def gpu(self) -> tuple[int, ...]:
        """Bytes on each GPU."""
        return tuple(g.total for g in self.gpus)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu)

    @property
    def ram(self) -> int:
        return self.cpu.total

    def as_json(self) -> list[dict]:
        return [d.as_json() for d in (*self.gpus, self.cpu)]


def kv_per_layer(shape: ModelShape, s: Settings) -> int:
    return 0 if shape.arch == "bert" else s.ubatch * 2 * shape.kv_heads * shape.head_dim * 2


def compute_bytes(shape: ModelShape, s: Settings) -> int:
    """The compute buffer the layers need (module docstring)."""
    per_token = 3 * shape.ffn + 3 * shape.hidden + shape.heads * shape.head_dim + (s.n_seq if shape.mean_pooling else 0)
    return 4 * s.ubatch * per_token + 2 * s.ubatch**2


def logits_bytes(shape: ModelShape, s: Settings) -> int:
    """The LM head's output a stock engine's qwen graphs compute for every token (llama-embed and BERT skip it)."""
    return 4 * s.ubatch * shape.vocab if shape.arch in LOGITS_ARCHS and not s.embeddings_only else 0


def lm_head_compute_bytes(shape: ModelShape, s: Settings) -> int:
    """The compute buffer while a stock engine's qwen graph runs its LM head: the logits, the f16 mask and two
    n_ubatch x hidden states (0 where no head runs)."""
    logits = logits_bytes(shape, s)
    return logits + 2 * s.ubatch**2 + 8 * s.ubatch * shape.hidden if logits else 0


def output_bytes(shape: ModelShape, s: Settings) -> int:
    """The host buffer of one decode's outputs: every token's state, and on a stock engine its logits too."""
    return 4 * max(s.n_seq, s.ubatch) * (shape.hidden + (0 if s.embeddings_only else shape.vocab))


def head_runtime_bytes(shape: ModelShape) -> int:
    """The head's weights plus one step's activations (GEGLU input is 8 x hidden wide)."""
    return shape.head_bytes + (4 * HEAD_STEP_ROWS * 12 * shape.hidden if shape.head_bytes else 0)


def needs(shape: ModelShape, quant: str, s: Settings, gpu_layers: tuple[int, ...] = ()) -> Needs:
    """Bytes on each GPU and in RAM with GPU_LAYERS[i] repeating layers on GPU i (the rest on the CPU)."""
    per_layer, other = layer_bytes(list(shape.tensors), quant, shape.layers, shape.n_gqa)
    kv = kv_per_layer(shape, s)
    compute = compute_bytes(shape, s)
    with_head = max(compute, lm_head_compute_bytes(shape, s))
    offloaded = any(gpu_layers)
    gpus, start = [], 0
    for i, n in enumerate(gpu_layers):
        layers = per_layer[start : start + n]
        runs_head = offloaded and not any(gpu_layers[:i])  # the first GPU that runs layers
        used = DeviceNeeds(f"GPU{i}", sum(layers), n * kv, with_head if runs_head else compute, overhead=CUDA_OVERHEAD)
        gpus.append(used if n else DeviceNeeds(f"GPU{i}"))
        start += n
    cpu_layers = per_layer[start:]
    # With every layer on GPUs the CPU still embeds the tokens: a small buffer of the input states.
    cpu_compute = compute if cpu_layers else 4 * s.ubatch * shape.hidden * 2
    cpu = DeviceNeeds(
        "CPU",
        weights=other + sum(cpu_layers),
        kv_cache=len(cpu_layers) * kv,
        compute=cpu_compute if offloaded else with_head,
        output=output_bytes(shape, s),
        head=head_runtime_bytes(shape),
        overhead=RUNTIME + VOCAB_BYTES_PER_TOKEN * shape.vocab,
    )
    size = file_bytes(list(shape.tensors), quant, shape.header_bytes, shape.layers, shape.n_gqa)
    return Needs(tuple(gpus), cpu, size)
