"""Bytes a run needs on each device: a pure function of (shapes, quant, settings, GPU layers).

What llama.cpp allocates for an embedding context (sizes it logs, checked in tests/test_plan.py):
- weights: each repeating layer on the device that runs it; the token embedding stays in RAM;
- KV cache (llama-embed keeps one, BERT none): n_ctx x layers x 2 x kv_heads x head_dim x f16;
- compute buffer with flash attention (what `auto` picks on CPU and on CUDA for these head sizes):
  4 bytes x n_ubatch x (3 x ffn + 4 x hidden + n_seq) for the largest layer's activations plus the
  f16 attention mask, 2 bytes x n_ubatch^2. Fitted to llama.cpp's reports for SmolLM2 and a
  Mistral-7B-shaped layer at n_ubatch 256..4096: within 3 %. Without flash attention the scores
  alone take 4 x heads x n_ubatch^2 bytes;
- the logits of the qwen2/qwen3 graphs: unlike llama-embed's, they apply the LM head (the tied token
  embedding) to every token even in embedding mode, so the compute buffer also holds 4 bytes x n_ubatch x
  vocab (2.3 GiB at n_ubatch 4096 for Qwen's 151k vocabulary): llama.cpp reported the sum within 2 % (over)
  for tiny Qwen2/Qwen3 models at 512 and 2048. On the CPU when no layer is offloaded; else on the first GPU,
  where ggml's scheduler offloads a large matmul whose weights sit in RAM (an estimate to confirm on a GPU);
- output buffer (host): in embedding mode every token of a decode is an output, and llama.cpp 0.3.36
  sizes the buffer for logits as well as embeddings (`output_reserve`: has_logits is always true), so a
  decode of n tokens takes 4 x n x (vocab + hidden) bytes, cleared (so resident) when it grows. The
  engine packs decodes up to n_ubatch tokens: 1 GiB at n_ubatch 2048 for Llama-3's 128k vocabulary;
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
LOGITS_ARCHS = ("qwen2", "qwen3")  # graphs that compute logits in embedding mode too
CUDA_OVERHEAD = 512 * MIB
HEAD_STEP_ROWS = 512  # runner/latent_attention.py ROWS_PER_STEP


@dataclass(frozen=True)
class Settings:
    max_length: int  # the longest sequence a micro-batch must hold

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
    return 4 * s.ubatch * (3 * shape.ffn + 4 * shape.hidden + s.n_seq) + 2 * s.ubatch**2


def logits_bytes(shape: ModelShape, s: Settings) -> int:
    """The LM head's output the qwen graphs compute for every token (llama-embed and BERT skip it)."""
    return 4 * s.ubatch * shape.vocab if shape.arch in LOGITS_ARCHS else 0


def output_bytes(shape: ModelShape, s: Settings) -> int:
    return 4 * max(s.n_seq, s.ubatch) * (shape.vocab + shape.hidden)


def head_runtime_bytes(shape: ModelShape) -> int:
    """The head's weights plus one step's activations (GEGLU input is 8 x hidden wide)."""
    return shape.head_bytes + (4 * HEAD_STEP_ROWS * 12 * shape.hidden if shape.head_bytes else 0)


def needs(shape: ModelShape, quant: str, s: Settings, gpu_layers: tuple[int, ...] = ()) -> Needs:
    """Bytes on each GPU and in RAM with GPU_LAYERS[i] repeating layers on GPU i (the rest on the CPU)."""
    per_layer, other = layer_bytes(list(shape.tensors), quant, shape.layers, shape.n_gqa)
    kv = kv_per_layer(shape, s)
    compute = compute_bytes(shape, s)
    logits = logits_bytes(shape, s)
    offloaded = any(gpu_layers)
    gpus, start = [], 0
    for i, n in enumerate(gpu_layers):
        layers = per_layer[start : start + n]
        extra = logits if offloaded and not any(gpu_layers[:i]) else 0  # the first GPU that runs layers
        used = DeviceNeeds(f"GPU{i}", sum(layers), n * kv, compute + extra, overhead=CUDA_OVERHEAD)
        gpus.append(used if n else DeviceNeeds(f"GPU{i}"))
        start += n
    cpu_layers = per_layer[start:]
    # With every layer on GPUs the CPU still embeds the tokens: a small buffer of the input states.
    cpu = DeviceNeeds(
        "CPU",
        weights=other + sum(cpu_layers),
        kv_cache=len(cpu_layers) * kv,
        compute=(compute if cpu_layers else 4 * s.ubatch * shape.hidden * 2) + (0 if offloaded else logits),
        output=output_bytes(shape, s),
        head=head_runtime_bytes(shape),
        overhead=RUNTIME + VOCAB_BYTES_PER_TOKEN * shape.vocab,
    )
    size = file_bytes(list(shape.tensors), quant, shape.header_bytes, shape.layers, shape.n_gqa)
    return Needs(tuple(gpus), cpu, size)
