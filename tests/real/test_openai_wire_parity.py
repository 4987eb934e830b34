"""The OpenAI-compatible fake (tests/fakeopenai.py) against the real servers: the same HTTP
requests go to Ollama v0.24.0's ``/v1`` and to llama.cpp's server (llama-cpp-python 0.3.36),
and to the fake in the matching dialect; status, Content-Type, framing (Content-Length or
chunked, and which SSE events share one HTTP chunk), the SSE line layout and the layout of every
JSON answer (keys, their order, value types) must agree, and so must error texts where they do
not depend on the machine. Generated text is never compared.

Responses are read with a plain socket client so that HTTP chunk boundaries are seen as sent.
Generation requests use ``max_tokens: 3`` and ``temperature: 0`` on a prompt that makes the
model talk, so the real finish_reason is ``length`` as the fake's is."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tests.fakeopenai import Dialect, FakeOpenAI, Fault, sse_events
from tests.real.conftest import LLAMA_N_CTX, MODEL, RealLlama, RealOllama

pytestmark = pytest.mark.real

USER = [{"role": "user", "content": "Tell me a long story about a dragon."}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
OLLAMA, LLAMA = "ollama", "llama"


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: Any = None  # JSON value, or bytes sent as they are
    exact: bool = False  # compare whole bodies byte for byte
    servers: tuple[str, ...] = (OLLAMA, LLAMA)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 3, "temperature": 0} | fields


def complete(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 3,
        "temperature": 0,
    } | fields


USAGE = {"stream_options": {"include_usage": True}}
#: Long enough for llama-dev's 2048-token context (the fake counts words as tokens).
LONG = "word " * (LLAMA_N_CTX + 500)

CASES = [
    # routing and listings
    Case("unknown-path", "GET", "/v1/nope", exact=True),
    Case("wrong-method", "GET", "/v1/chat/completions", exact=True),
    Case("models", "GET", "/v1/models"),
    Case("model", "GET", "/v1/models/" + MODEL),
    Case("model-unknown", "GET", "/v1/models/nope:1b", exact=True),
    # answers (layout only)
    Case("chat-stream", "POST", "/v1/chat/completions", chat(stream=True)),
    Case("chat-stream-usage", "POST", "/v1/chat/completions", chat(stream=True, **USAGE)),
    Case("chat-whole", "POST", "/v1/chat/completions", chat()),
    Case("chat-n-2", "POST", "/v1/chat/completions", chat(n=2)),
    Case("completions-stream", "POST", "/v1/completions", complete(stream=True)),
    Case("completions-stream-usage", "POST", "/v1/completions", complete(stream=True, **USAGE)),
    Case("completions-whole", "POST", "/v1/completions", complete()),
    Case("embeddings", "POST", "/v1/embeddings", {"model": MODEL, "input": "hello world"}),
    Case("embeddings-list", "POST", "/v1/embeddings", {"model": MODEL, "input": ["a", "b c"]}),
    # what each server refuses, or does not
    Case("unknown-model", "POST", "/v1/chat/completions", chat(model="nope:1b")),
    Case(
        "unknown-model-stream", "POST", "/v1/chat/completions", chat(model="nope:1b", stream=True)
    ),
    Case(
        "no-messages",
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "max_tokens": 3, "temperature": 0},
    ),
    Case("empty-messages", "POST", "/v1/chat/completions", chat(messages=[])),
    # llama-cpp-python answers as the GGUF's file path: only the status would agree
    Case(
        "no-model",
        "POST",
        "/v1/chat/completions",
        {"messages": USER, "max_tokens": 3},
        servers=(OLLAMA,),
    ),
    Case("messages-type", "POST", "/v1/chat/completions", chat(messages="hi")),
    Case("temperature-type", "POST", "/v1/chat/completions", chat(temperature="hot")),
    Case("max-tokens-type", "POST", "/v1/chat/completions", chat(max_tokens="3")),
    Case("truncated-json", "POST", "/v1/chat/completions", b'{"model":', exact=True),
    Case("empty-body", "POST", "/v1/chat/completions", b"", exact=True),
    Case("tools", "POST", "/v1/chat/completions", chat(tools=TOOLS)),
    Case(
        "json-schema",
        "POST",
        "/v1/chat/completions",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            }
        ),
    ),
    Case("embeddings-no-input", "POST", "/v1/embeddings", {"model": MODEL}),
    Case("embeddings-unknown-model", "POST", "/v1/embeddings", {"model": "nope:1b", "input": "a"}),
    # Ollama truncates an overlong prompt (and takes minutes over it on 2 cores): llama only.
    Case(
        "overflow",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": LONG}]),
        servers=(LLAMA,),
    ),
    Case(
        "overflow-stream",
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": LONG}], stream=True),
        servers=(LLAMA,),
    ),
    Case(
        "overflow-completions", "POST", "/v1/completions", complete(prompt=LONG), servers=(LLAMA,)
    ),
]
PARAMS = [
    pytest.param(server, case, id=f"{server}-{case.id}")
    for case in CASES
    for server in case.servers
]

#: Values (not only types) that must agree.
VALUE_KEYS = (
    "object",
    "role",
    "finish_reason",
    "type",
    "code",
    "param",
    "index",
    "owned_by",
    "model",
    "system_fingerprint",
    "detail",
    "status",
)


@dataclass
class Seen:
    """One response as it came off the socket."""

    status: int
    headers: dict[str, str]
    chunks: list[bytes] | None  # HTTP chunks when chunked, else None
    body: bytes

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def framing(self) -> str:
        return "chunked" if self.chunks is not None else "length"


async def send(url: str, case: Case) -> Seen:
    """Sends one request on a fresh connection and reads the answer byte for byte."""
    host, port = url.removeprefix("http://").split(":")
    if isinstance(case.body, bytes):
        payload = case.body
    elif case.body is None:
        payload = b""
    else:
        payload = orjson.dumps(case.body)
    head = f"{case.method} {case.path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    if case.method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()
        async with asyncio.timeout(300):
            raw = await reader.read()  # Connection: close: the server ends the stream
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    header_block, _, body = rest.partition(b"\r\n\r\n")
    headers = {}
    for line in header_block.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    if "chunked" not in headers.get("transfer-encoding", ""):
        return Seen(status, headers, None, body)
    chunks: list[bytes] = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        chunks.append(body[:size])
        body = body[size + 2 :]
    return Seen(status, headers, chunks, b"".join(chunks))


def layout(value: Any) -> Any:
    """Keys in order and value types, recursively (lists: the layout of their first item)."""
    if isinstance(value, dict):
        return [(k, layout(v)) for k, v in value.items()]
    if isinstance(value, list):
        return ["list", layout(value[0])] if value else ["list"]
    return type(value).__name__


def values(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (v if k in VALUE_KEYS else values(v))
            for k, v in value.items()
            if k in VALUE_KEYS or isinstance(v, dict | list)
        }
    if isinstance(value, list):
        return [values(v) for v in value[:1]]
    return None


def event_kind(data: str) -> Any:
    """An SSE event's identity for comparison: [DONE], or its JSON layout and values."""
    if data == "[DONE]":
        return "[DONE]"
    obj = orjson.loads(data)
    return orjson.dumps([layout(obj), values(obj)]).decode()


SPACED = re.compile(rb'^\{"\w+": ')


def spacing(data: str) -> str:
    """How the server serialises JSON: compact (Go, orjson) or with spaces (Python's json)."""
    return "spaced" if data.startswith('{"id": ') else "compact"


def collapse(items: list[Any]) -> list[Any]:
    """Consecutive duplicates merged: three token chunks and twenty look the same."""
    out: list[Any] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


def stream_shape(seen: Seen) -> Any:
    """Per HTTP chunk, the kinds of the events it holds; then the whole body's line endings."""
    assert seen.chunks is not None
    per_chunk = [tuple(event_kind(d) for _, d in sse_events(c)) for c in seen.chunks]
    return collapse(per_chunk)


async def assert_same(real: Seen, ours: Seen, case: Case) -> None:
    assert (ours.status, ours.content_type) == (real.status, real.content_type), (
        ours.body[:300],
        real.body[:300],
    )
    assert ours.headers.get("allow") == real.headers.get("allow")
    if case.exact:
        assert ours.body == real.body
    if (real.content_type or "").startswith("text/event-stream"):
        assert ours.framing == real.framing == "chunked"
        assert b"\r" not in real.body and b"\r" not in ours.body
        assert stream_shape(ours) == stream_shape(real)
        datas = [d for _, d in sse_events(real.body)] + [d for _, d in sse_events(ours.body)]
        assert len({spacing(d) for d in datas if d != "[DONE]"}) <= 1
        # every event is exactly "data: <json>\n\n", one per HTTP chunk or packed together
        for body in (real.body, ours.body):
            for block in filter(None, body.split(b"\n\n")):
                assert block.startswith(b"data: ") and b"\n" not in block, block[:80]
        return
    # Small answers carry a Content-Length, large ones may be chunked: the same rule applies.
    assert ours.framing == real.framing, (ours.framing, real.framing, len(real.body))
    if not (real.content_type or "").startswith("application/json"):
        assert ours.body == real.body
        return
    mine, theirs = orjson.loads(ours.body), orjson.loads(real.body)
    assert layout(mine) == layout(theirs)
    assert values(mine) == values(theirs)
    assert ours.body.endswith(b"\n") == real.body.endswith(b"\n")
    assert bool(SPACED.match(ours.body)) == bool(SPACED.match(real.body))  # the serialiser
    if case.path == "/v1/embeddings" and real.status == 200:
        for a, b in zip(mine["data"], theirs["data"], strict=True):
            assert len(a["embedding"]) == len(b["embedding"]) == 576
            norm_a, norm_b = math.hypot(*a["embedding"]), math.hypot(*b["embedding"])
            # Ollama normalises; llama-cpp-python's mean-pooled vectors are not (norm ~ 40)
            assert math.isclose(norm_a, 1.0, abs_tol=1e-3) == math.isclose(
                norm_b, 1.0, abs_tol=1e-3
            )


def make_fake(server: str) -> FakeOpenAI:
    dialect: Dialect = "ollama" if server == OLLAMA else "llama-cpp-python"
    fake = FakeOpenAI(
        dialect=dialect, models=(MODEL,), embed_dims=576, tokens=["Once", " upon", " a", " time"]
    )
    fake.tools_supported = False  # smollm2:135m in Ollama: completion only
    if server == LLAMA:
        fake.context_window = LLAMA_N_CTX
    return fake


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[[str], Awaitable[FakeOpenAI]]]:
    made: list[FakeOpenAI] = []

    async def get(server: str) -> FakeOpenAI:
        fake = make_fake(server)
        await fake.start()
        made.append(fake)
        return fake

    yield get
    for fake in made:
        await fake.stop()


MakeFake = Callable[[str], Awaitable[FakeOpenAI]]
OLLAMA_CASES = [c for c in CASES if OLLAMA in c.servers]
LLAMA_CASES = [c for c in CASES if LLAMA in c.servers]


@pytest.mark.parametrize("case", OLLAMA_CASES, ids=[c.id for c in OLLAMA_CASES])
async def test_fake_answers_like_ollama_v1(
    case: Case, real_ollama: RealOllama, fakes: MakeFake
) -> None:
    real = await send(real_ollama.url, case)
    ours = await send((await fakes(OLLAMA)).url, case)
    await assert_same(real, ours, case)


@pytest.mark.parametrize("case", LLAMA_CASES, ids=[c.id for c in LLAMA_CASES])
async def test_fake_answers_like_llama_cpp_server(
    case: Case, real_llama: RealLlama, fakes: MakeFake
) -> None:
    real = await send(real_llama.url, case)
    ours = await send((await fakes(LLAMA)).url, case)
    await assert_same(real, ours, case)


#: A prompt that takes the model a while to read, so that the first event comes late.
SLOW_PROMPT = [{"role": "user", "content": "word " * 1500}]


async def test_when_the_headers_go_out(real_ollama: RealOllama, real_llama: RealLlama) -> None:
    """uvicorn (llama-cpp-python) sends the SSE head at once, before the prompt is read; Go's
    net/http (Ollama) sends it with the first event. A backend must not take the head's arrival
    for the first token. The fake's dialects do the same."""
    body = chat(messages=SLOW_PROMPT, max_tokens=1, stream=True)
    assert await head_alone(real_llama.url, body) is True
    assert await head_alone(real_ollama.url, chat(stream=True)) is False
    dialects: list[tuple[Dialect, bool]] = [
        ("llama-cpp-python", True),
        ("ollama", False),
        ("openai", True),
    ]
    for dialect, alone in dialects:
        async with FakeOpenAI(dialect=dialect, models=(MODEL,)) as fake:
            fake.set_fault(Fault(delay_first=0.3))
            assert await head_alone(fake.url, chat(stream=True)) is alone, dialect


async def head_alone(url: str, body: dict[str, Any]) -> bool:
    """True when the first read that completes the response head holds nothing after it."""
    host, port = url.removeprefix("http://").split(":")
    payload = orjson.dumps(body)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        seen = b""
        async with asyncio.timeout(300):
            while b"\r\n\r\n" not in seen:
                data = await reader.read(65536)
                assert data, seen
                seen += data
            assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
            await reader.read()  # let the answer finish before the next request
        return seen.endswith(b"\r\n\r\n")
    finally:
        writer.close()
        await writer.wait_closed()
