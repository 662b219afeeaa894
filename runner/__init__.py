"""Runner: load a GGUF embedder into llama.cpp and turn texts into vectors."""

from runner.api import Embedder

__all__ = ["Embedder"]
