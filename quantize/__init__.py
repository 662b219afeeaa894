"""Conversion stage: Hugging Face checkpoints -> GGUF F16/F32/BF16 -> llama.cpp quant ladder."""

from quantize.openmp import set_wait_default

CONVERTER_VERSION = "0.1.0"

# Before any module of this package (or of runner/, planner/) loads llama.cpp's library: see quantize/openmp.py.
set_wait_default()
