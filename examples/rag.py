"""Retrieval for RAG: embed passages into a vector database, query it, and check it against exact search.

    pip install qdrant-client        # the vector database, in local mode: a folder, no server
    python examples/rag.py           # all-minilm-l6-v2, the offline demo model; -m for any other

The passages (examples/passages.jsonl: 300 short texts on 14 topics) are embedded with `Embedder`, stored in
Qdrant's local mode with their text and topic, and searched with a few questions (queries get the model's
query template, passages none). Each question's 10 nearest passages from the database are compared with an
exact numpy search over the same vectors: recall@10 below --min-recall exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models

from runner import Embedder

PASSAGES = Path(__file__).with_name("passages.jsonl")
QUESTIONS = [
    "How do plants turn sunlight into sugar?",
    "What happens when a massive star collapses?",
    "How should I water tomatoes in summer?",
    "Why does bread dough need to rest?",
    "How do I get a refund for a damaged order?",
    "What is compound interest?",
    "Who won the first football world cup?",
    "What causes sea levels to rise?",
    "How do vaccines train the immune system?",
    "What is a memory leak in a program?",
    "Which planet has the Great Red Spot?",
    "What does a tenant's lease protect?",
    "How is a symphony structured?",
    "What should I pack for a long flight?",
    "When did the Roman Empire fall?",
]
K = 10


def read_passages(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def recall_at_k(found: list[list[int]], exact: list[list[int]]) -> float:
    """The share of the exact top-k that the database returned, over all queries."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-m", "--model", default="all-minilm-l6-v2", help="anything `runner embed -m` takes")
    parser.add_argument("--db", type=Path, help="Qdrant folder (default: a temporary one)")
    parser.add_argument("--min-recall", type=float, default=0.99, help="recall@10 below this exits 1")
    args = parser.parse_args(argv)

    passages = read_passages(PASSAGES)
    with Embedder(args.model) as model, tempfile.TemporaryDirectory() as tmp:
        docs = model.encode_document([p["text"] for p in passages])
        queries = model.encode_query(QUESTIONS)

        client = QdrantClient(path=str(args.db or tmp))
        if client.collection_exists("passages"):
            client.delete_collection("passages")
        client.create_collection(
            "passages", vectors_config=models.VectorParams(size=model.dims, distance=models.Distance.COSINE)
        )
        client.upload_collection(
            "passages",
            vectors=docs,
            payload=[{"text": p["text"], "topic": p["topic"]} for p in passages],
            ids=[p["id"] for p in passages],
        )
        found = []
        for question, vector in zip(QUESTIONS, queries, strict=True):
            hits = client.query_points("passages", query=vector.tolist(), limit=K).points
            found.append([hit.id for hit in hits])
            print(f"{question}\n  {hits[0].score:.3f} [{hits[0].payload['topic']}] {hits[0].payload['text'][:100]}")
        client.close()

    # Exact search: the vectors are L2-normalised, so the dot product is the cosine.
    exact = np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :K]
    recall = recall_at_k(found, [[passages[i]["id"] for i in row] for row in exact])
    print(f"recall@{K} against exact search: {recall:.3f} ({len(QUESTIONS)} queries, {len(passages)} passages)")
    return 0 if recall >= args.min_recall else 1


if __name__ == "__main__":
    sys.exit(main())
