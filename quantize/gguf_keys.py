"""GGUF metadata keys this project writes beyond llama.cpp's own (all under one namespace).

llama.cpp ignores keys it does not know, so these travel inside every quant of a model and let a
bare GGUF file be embedded without a registry entry.
"""

NAMESPACE = "embedrunner"
SOURCE_REPO = f"{NAMESPACE}.source.repo"
SOURCE_REVISION = f"{NAMESPACE}.source.revision"
# What the file was made from (source files' names, sizes and mtimes, registry entry, converter version):
# a later conversion of an unchanged source reuses the file instead of writing it again.
SOURCE_STAMP = f"{NAMESPACE}.source.stamp"
CONVERTER_VERSION = f"{NAMESPACE}.converter.version"
# The checkpoint's weights type as its config.json names it (bfloat16, float16, float32): whether a BF16 file holds
# them exactly, which the planner needs once only GGUFs are at hand.
SOURCE_DTYPE = f"{NAMESPACE}.source.dtype"
POOLING = f"{NAMESPACE}.pooling"
MAX_LENGTH = f"{NAMESPACE}.max_length"
QUERY_PROMPT = f"{NAMESPACE}.prompt.query"
DOCUMENT_PROMPT = f"{NAMESPACE}.prompt.document"
DEFAULT_TASK = f"{NAMESPACE}.prompt.default_task"
LICENSE_NOTE = f"{NAMESPACE}.license_note"
# "huggingface" when llama.cpp's tokenizer does not reproduce the HF one for this vocabulary (WordPiece):
# the runner then tokenizes with the `tokenizers` library from tokenizer.huggingface.json in the file.
TOKENIZER = f"{NAMESPACE}.tokenizer"
# A Unicode normalisation the HF tokenizer applies first and llama.cpp's does not ("NFC" for Qwen2's BPE):
# the runner normalises each text that way before handing it to llama.cpp's tokenizer.
NORMALIZER = f"{NAMESPACE}.tokenizer.normalizer"
# Matryoshka: the dimensions the model was trained to be cut to, comma-separated, rising to its width
# ("32,64,...,4096"); a model without it refuses --dimensions (runner/compact.py).
MATRYOSHKA_DIMS = f"{NAMESPACE}.matryoshka.dims"
# Latent-attention pooling (NV-Embed): llama.cpp returns per-token states (pooling none) and the runner
# applies the head stored in a sidecar GGUF next to the trunk; its sha256 ties the two together.
HEAD_FILE = f"{NAMESPACE}.head.file"
HEAD_SHA256 = f"{NAMESPACE}.head.sha256"
# True: the instruction prefix's tokens (counted without BOS, zeroed from position 0) leave the mean.
POOL_SKIP_INSTRUCTION = f"{NAMESPACE}.pooling.skip_instruction"
# True: one EOS token follows every input (NV-Embed appends the eos_token string to each text).
APPEND_EOS = f"{NAMESPACE}.append_eos"
# How a quant was made beyond its ftype. llama-quantize's own keys name the importance matrix it used
# (tools/quantize/quantize.cpp); ours add its sha256 and the tensor-type overrides (`regex=TYPE`, comma-separated).
IMATRIX_FILE = "quantize.imatrix.file"
IMATRIX_DATASET = "quantize.imatrix.dataset"
IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"
IMATRIX_SHA256 = f"{NAMESPACE}.imatrix.sha256"
TENSOR_TYPES = f"{NAMESPACE}.quantize.tensor_types"
