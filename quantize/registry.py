"""The model registry, models.toml: what each supported model is and where it comes from."""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from quantize.errors import BadInput

POOLINGS = ("mean", "cls", "last", "latent-attention")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: str
    pooling: str
    dims: int
    max_length: int
    license: str
    repo: str | None = None
    package: str | None = None
    revision: str | None = None
    query_prompt: str = "{text}"
    document_prompt: str = "{text}"
    default_task: str | None = None
    license_note: str = ""
    embedder: bool = False
    # Causal attention, as last-token embedders like Qwen3-Embedding and e5-mistral were trained; false: bidirectional.
    causal: bool = False
    # config.json keys that give the model's shapes, so `runner plan` works before download
    shape: dict | None = None
    # Matryoshka: the dimensions the model was trained to be cut to, rising to `dims` (none: it cannot be cut)
    matryoshka_dims: list[int] | None = None

    def config(self) -> dict:
        """An HF config.json stand-in built from the shape table."""
        return {"architectures": [self.architecture], **(self.shape or {})}


def registry_path() -> Path:
    """models.toml: $EMBEDRUNNER_MODELS, else the source checkout's, else the installed copy."""
    if env := os.environ.get("EMBEDRUNNER_MODELS"):
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "models.toml"
    if checkout.is_file():
        return checkout
    return Path(sys.prefix) / "share" / "llm-embed-runner" / "models.toml"


def load_registry(path: Path | None = None) -> dict[str, ModelEntry]:
    path = path or registry_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: model registry not found; set EMBEDRUNNER_MODELS to a models.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: not valid TOML ({e}); fix the file") from None
    known = {f.name for f in fields(ModelEntry)} - {"name"}
    entries = {}
    for name, table in raw.items():
        unknown = set(table) - known
        if unknown:
            raise BadInput(f"{path}: [{name}] has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        try:
            entry = ModelEntry(name=name, **table)
        except TypeError as e:
            raise BadInput(f"{path}: [{name}] is incomplete ({e})") from None
        if entry.pooling not in POOLINGS:
            raise BadInput(f"{path}: [{name}] pooling {entry.pooling!r} is not one of {POOLINGS}")
        dims = entry.matryoshka_dims
        if dims is not None and (
            not all(isinstance(d, int) and d > 0 for d in dims) or dims != sorted(set(dims)) or dims[-1] != entry.dims
        ):
            raise BadInput(f"{path}: [{name}] matryoshka_dims must be rising whole numbers ending at {entry.dims}")
        if entry.repo is None and entry.package is None:
            raise BadInput(f"{path}: [{name}] needs `repo` (a hub repo id) or `package` (an installed snapshot)")
        entries[name] = entry
    return entries
