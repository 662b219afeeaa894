"""Conversion stage: Hugging Face checkpoints -> GGUF F16/F32/BF16 -> llama.cpp quant ladder."""

CONVERTER_VERSION = "0.1.0"
