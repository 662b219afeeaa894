"""GGUF metadata keys this project writes beyond llama.cpp's own (all under one namespace).

llama.cpp ignores keys it does not know, so these travel inside every quant of a model and let a
bare GGUF file be embedded without a registry entry.
"""

NAMESPACE = "embedrunner"
SOURCE_REPO = f"{NAMESPACE}.source.repo"
SOURCE_REVISION = f"{NAMESPACE}.source.revision"
CONVERTER_VERSION = f"{NAMESPACE}.converter.version"
POOLING = f"{NAMESPACE}.pooling"
MAX_LENGTH = f"{NAMESPACE}.max_length"
QUERY_PROMPT = f"{NAMESPACE}.prompt.query"
DOCUMENT_PROMPT = f"{NAMESPACE}.prompt.document"
DEFAULT_TASK = f"{NAMESPACE}.prompt.default_task"
LICENSE_NOTE = f"{NAMESPACE}.license_note"
# "huggingface" when llama.cpp's tokenizer does not reproduce the HF one for this vocabulary (WordPiece):
# the runner then tokenizes with the `tokenizers` library from tokenizer.huggingface.json in the file.
TOKENIZER = f"{NAMESPACE}.tokenizer"
