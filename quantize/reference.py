"""What `-m MODEL` names, decided once: a GGUF file, a model directory of GGUFs (a path, or a name in the models
home), an HF checkpoint directory, a models.toml name, or a hub repo id.

Every reader of `-m` (the planner, the disk plan, resolution, `runner rm`/`verify`) takes a ModelRef, so they
cannot disagree about what a string means; `~` is expanded here and nowhere else.

>>> ModelRef.parse("all-minilm-l6-v2").kind
<Kind.REGISTRY: 'registry'>
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from quantize.errors import ModelNotFound
from quantize.files import models_home
from quantize.registry import ModelEntry, load_registry

GGUF_SUFFIX = ".gguf"


class Kind(StrEnum):
    GGUF = "gguf"  # one GGUF file, run as it is
    STORE = "store"  # a directory of <name>-<QUANT>.gguf files: a path, or a converted checkpoint's name in the home
    CHECKPOINT = "checkpoint"  # an HF checkpoint directory (config.json), converted into the models home
    REGISTRY = "registry"  # a models.toml name: its store in the models home, else its package or hub repo
    HUB = "hub"  # a hub repo id (owner/name), downloaded and converted into the models home


@dataclass(frozen=True)
class ModelRef:
    text: str  # as the user wrote it: what messages name
    kind: Kind
    path: Path | None = None  # GGUF, STORE, CHECKPOINT: the path (~ expanded; a STORE name: its models home dir)
    entry: ModelEntry | None = None  # REGISTRY: its models.toml entry

    @staticmethod
    def parse(model: str | ModelRef) -> ModelRef:
        """MODEL classified: an existing path is a GGUF file, a checkpoint (a directory with config.json) or a
        store; else a registry name, a directory of the models home (`runner models` lists them), or a hub repo id.
        A missing path that looks like one (`/`, `~` or `.` at the start, more than one `/`, a .gguf name) is a
        ModelNotFound naming it, not a registry lookup."""
        if isinstance(model, ModelRef):
            return model
        path = Path(model).expanduser()
        if path.is_file():
            return ModelRef(model, Kind.GGUF, path)
        if path.is_dir():
            return ModelRef(model, Kind.CHECKPOINT if (path / "config.json").is_file() else Kind.STORE, path)
        if _looks_like_path(model):
            where = f" ({path})" if str(path) != model else ""
            raise ModelNotFound(f"{model}: no such file or directory{where}")
        registry = load_registry()
        if model in registry:
            return ModelRef(model, Kind.REGISTRY, entry=registry[model])
        if "/" not in model and (home := models_home() / model).is_dir():
            return ModelRef(model, Kind.STORE, home)
        if _is_repo_id(model):
            return ModelRef(model, Kind.HUB)
        raise ModelNotFound(
            f"{model}: no such file, directory or registry name (known: {', '.join(sorted(registry))}), "
            "nor a hub repo id (owner/name)"
        )

    @property
    def repo(self) -> str | None:
        """The hub repo the model comes from (REGISTRY, HUB), else None."""
        if self.kind is Kind.HUB:
            return self.text
        return self.entry.repo if self.entry is not None else None

    @property
    def home(self) -> Path | None:
        """REGISTRY: its directory in the models home (where its GGUFs are made and looked for); else None."""
        return models_home() / self.text if self.kind is Kind.REGISTRY else None

    def __str__(self) -> str:
        return self.text


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "~", ".")) or model.count("/") > 1 or model.lower().endswith(GGUF_SUFFIX)


def _is_repo_id(model: str) -> bool:
    """owner/name as the hub spells repo ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.count("/") != 1:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True
