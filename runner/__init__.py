"""Runner: load a GGUF embedder into llama.cpp and turn texts into vectors."""
