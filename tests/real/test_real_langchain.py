"""``ChatTokenwire`` in a real LCEL chain against the real Ollama: retriever → prompt → model →
parser, streamed, and the text compared with Ollama's own /api/chat answer for the same
messages at temperature 0 with the same seed (they must be identical). Then stop sequences:
the answer with a stop sequence is the one Ollama itself gives with it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.messages import BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from tests.real.conftest import MODEL
from tokenwire.langchain import ChatTokenwire
from tokenwire.service import Runtime

pytestmark = pytest.mark.real

MAX_TOKENS = 40
SEED = 42
DOCS = [
    "The Eiffel Tower is in Paris and was finished in 1889.",
    "Rayleigh scattering makes the sky look blue: air scatters short wavelengths most.",
    "tokenwire streams tokens from Ollama over gRPC.",
]
QUESTION = "Why is the sky blue?"


class WordCounts(Embeddings):
    """A deterministic embedding: counts of a fixed vocabulary's words (enough for a
    retriever to find the right document in a test, with no model download)."""

    VOCABULARY = ("sky", "blue", "scatter", "air", "paris", "tower", "grpc", "tokens")

    def _embed(self, text: str) -> list[float]:
        words = re.findall(r"[a-z]+", text.lower())
        return [float(sum(w.startswith(v) for w in words)) + 1e-3 for v in self.VOCABULARY]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._embed(text)


PROMPT = ChatPromptTemplate.from_messages([
    ("system", "Answer in two sentences, using this context:\n{context}"),
    ("human", "{question}"),
])


def context(docs: list[Document]) -> str:
    return "\n".join(d.page_content for d in docs)


@pytest.fixture
async def model(real_runtime: Runtime) -> AsyncIterator[ChatTokenwire]:
    chat = ChatTokenwire(model=MODEL, target=real_runtime.target, temperature=0, seed=SEED,
                         max_tokens=MAX_TOKENS, timeout=300)
    yield chat
    await chat.aclose()


async def ollama_answer(http: httpx.AsyncClient, messages: list[BaseMessage],
                        **options: object) -> dict[str, object]:
    """Ollama's own whole answer (stream:false) for the same messages and options."""
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    body = {"model": MODEL, "stream": False,
            "messages": [{"role": roles[m.type], "content": m.content} for m in messages],
            "options": {"temperature": 0, "seed": SEED, "num_predict": MAX_TOKENS, **options}}
    response = await http.post("/api/chat", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


async def test_lcel_rag_chain_streams_ollamas_own_answer(
        model: ChatTokenwire, ollama_http: httpx.AsyncClient) -> None:
    store = InMemoryVectorStore.from_texts(DOCS, WordCounts())
    retriever = store.as_retriever(search_kwargs={"k": 1})
    chain = ({"context": retriever | context, "question": RunnablePassthrough()}
             | PROMPT | model | StrOutputParser())

    pieces = [piece async for piece in chain.astream(QUESTION)]
    streamed = "".join(pieces)
    assert len([p for p in pieces if p]) > 3  # streamed token by token, not as one piece

    # The retriever found the scattering document, and the model saw it in its prompt.
    docs = await retriever.ainvoke(QUESTION)
    assert docs[0].page_content == DOCS[1]
    messages = PROMPT.invoke({"context": context(docs), "question": QUESTION}).to_messages()
    reference = await ollama_answer(ollama_http, messages)
    assert streamed == reference["message"]["content"]  # type: ignore[index]

    # The model's own last chunk: usage and finish reason, as Ollama counted.
    last = [chunk async for chunk in model.astream(messages)][-1]
    assert last.usage_metadata is not None
    assert last.usage_metadata["output_tokens"] == reference["eval_count"] == MAX_TOKENS
    assert last.response_metadata["finish_reason"] == "length"
    assert last.response_metadata["model_name"] == MODEL


async def test_stop_sequence_ends_the_answer_where_ollama_does(
        model: ChatTokenwire, ollama_http: httpx.AsyncClient) -> None:
    messages = PROMPT.invoke({"context": DOCS[1], "question": QUESTION}).to_messages()
    whole = str((await model.ainvoke(messages)).content)
    words = re.findall(r"[A-Za-z]{4,}", whole)
    assert len(words) > 4, whole
    stop = f" {words[len(words) // 2]}"  # a word from the middle of the answer
    cut = await model.ainvoke(messages, stop=[stop])
    reference = await ollama_answer(ollama_http, messages, stop=[stop])
    assert cut.content == reference["message"]["content"]  # type: ignore[index]
    assert cut.content == whole[:whole.index(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
