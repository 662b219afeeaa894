"""RAG frameworks' own embedding classes against `runner serve`: their vectors equal `runner embed`'s.

LangChain (langchain-openai, langchain-ollama) and LlamaIndex (llama-index-embeddings-openai), as
docs/serving.md tells users to configure them; and LangChain's default, which sends tiktoken's token ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA, embed_file, run_cli, texts
from tests.test_server import MINILM, Server, assert_same, cosines, serving

ITEMS = texts("embedding_texts.jsonl")[:24]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> np.ndarray:
    """`runner embed`'s vectors of the first texts (the model converted once, before the server loads it)."""
    work = tmp_path_factory.mktemp("integrations")
    run_cli("convert", MINILM)
    return embed_file(MINILM, DATA / "embedding_texts.jsonl", work / "ref.npy", "--quant", "F16")[: len(ITEMS)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, reference) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("integrations-serve"), "-m", MINILM, "--quant", "F16") as s:
        yield s


def test_langchain_openai_embeddings(server, reference) -> None:
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(
        model=MINILM, base_url=server.url + "/v1", api_key="unused", check_embedding_ctx_length=False
    )
    assert_same(np.array(emb.embed_documents(ITEMS), dtype=np.float32), reference)
    assert_same(np.array([emb.embed_query(ITEMS[3])], dtype=np.float32), reference[3:4])


def test_langchain_ollama_embeddings(server, reference) -> None:
    from langchain_ollama import OllamaEmbeddings

    emb = OllamaEmbeddings(model=MINILM, base_url=server.url)
    assert_same(np.array(emb.embed_documents(ITEMS), dtype=np.float32), reference)
    assert_same(np.array([emb.embed_query(ITEMS[7])], dtype=np.float32), reference[7:8])


def test_llama_index_openai_embedding(server, reference) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    # model_name= (not model=, which only takes OpenAI's own names) is sent as the request's model.
    emb = OpenAIEmbedding(model_name=MINILM, api_base=server.url + "/v1", api_key="unused")
    assert_same(np.array(emb.get_text_embedding_batch(ITEMS), dtype=np.float32), reference)
    assert_same(np.array([emb.get_query_embedding(ITEMS[5])], dtype=np.float32), reference[5:6])


def test_langchain_default_sends_tiktoken_ids(server, reference, monkeypatch) -> None:
    """Left at check_embedding_ctx_length=True, LangChain sends cl100k token ids, not text: the server reads them
    as this model's ids, so a vector comes back for other words (or a 400 when an id is past the vocabulary)."""
    import llama_index.core
    import openai
    from langchain_openai import OpenAIEmbeddings

    # tiktoken downloads cl100k_base; LlamaIndex ships a copy, so this runs offline.
    cache = Path(llama_index.core.__file__).parent / "_static" / "tiktoken_cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    emb = OpenAIEmbeddings(model=MINILM, base_url=server.url + "/v1", api_key="unused")
    text = "hello world"  # cl100k ids 15339, 1917: inside MiniLM's 30522, so no error, other tokens
    wrong = np.array([emb.embed_query(text)], dtype=np.float32)
    right = server.embed([text])
    assert cosines(wrong, right)[0] < 0.9
    with pytest.raises(openai.BadRequestError) as e:  # cl100k ids 37668, 43703, 46066: past MiniLM's vocabulary
        emb.embed_query("Entschuldigung, Weltmeisterschaft")
    assert e.value.status_code == 400 and "vocabulary" in str(e.value)
