"""The test upstream (tests/fakeollama.py) against the real Ollama: the same HTTP requests go to
both, and status, Content-Type, framing (Content-Length or chunked), error texts and the layout
of every JSON answer (keys, their order, value types) must agree. This keeps the fake honest:
the e2e tier is only as good as its resemblance to the real thing.

The fake is configured like the real setup: one model, smollm2:135m, which can only complete
(no thinking, tools or insert), 576-dimensional embeddings, version 0.24.0."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from tests.fakeollama import FakeOllama
from tests.real.conftest import MODEL, OLLAMA_VERSION, RealOllama

pytestmark = pytest.mark.real

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f"}}]


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: Any = None  # JSON value, or bytes sent as they are
    exact: bool = True  # compare bodies byte for byte (else: JSON layout and key values)
    headers: tuple[tuple[str, str], ...] = ()


def gen(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi"} | fields


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER} | fields


CASES = [
    # routing and plain endpoints
    Case("unknown-path", "GET", "/api/nope"),
    Case("wrong-method", "GET", "/api/generate"),
    Case("root", "GET", "/"),
    Case("foreign-host", "GET", "/", headers=(("Host", "example.com"),)),
    Case("version", "GET", "/api/version"),
    Case("tags", "GET", "/api/tags", exact=False),
    # request decoding and validation, in Ollama's order
    Case("empty-body", "POST", "/api/generate", b""),
    Case("truncated-body", "POST", "/api/generate", b'{"model":'),
    Case("top-logprobs", "POST", "/api/generate", gen(top_logprobs=50)),
    Case("generate-unknown-model", "POST", "/api/generate", gen(model="nope:1b")),
    Case("chat-unknown-model", "POST", "/api/chat", chat(model="nope:1b")),
    Case("embed-unknown-model", "POST", "/api/embed", {"model": "nope:1b", "input": "a"}),
    Case("generate-without-model", "POST", "/api/generate", {"prompt": "hi"}),
    Case("chat-without-model", "POST", "/api/chat", {"messages": []}),
    Case("embed-without-model", "POST", "/api/embed", {"model": "", "input": "a"}),
    Case("raw-with-system", "POST", "/api/generate", gen(raw=True, system="x")),
    Case("think-generate", "POST", "/api/generate", gen(think=True)),
    Case("think-chat", "POST", "/api/chat", chat(think=True)),
    Case("think-max", "POST", "/api/generate", gen(think="max")),
    Case("think-invalid", "POST", "/api/generate", gen(think="x")),
    Case("think-before-tools", "POST", "/api/chat", chat(think=True, tools=TOOLS)),
    Case("tools", "POST", "/api/chat", chat(tools=TOOLS)),
    Case("tools-before-options", "POST", "/api/chat",
         chat(tools=TOOLS, options={"temperature": "hot"})),
    Case("suffix", "POST", "/api/generate", gen(suffix="end")),
    Case("option-type", "POST", "/api/generate", gen(options={"temperature": "hot"})),
    Case("option-stop-type", "POST", "/api/generate", gen(options={"stop": "x"})),
    Case("keep-alive-no-unit", "POST", "/api/generate", gen(keep_alive="300")),
    Case("keep-alive-negative-string", "POST", "/api/generate", gen(keep_alive="-1")),
    Case("format-streaming", "POST", "/api/generate", gen(format="yaml")),
    Case("format-whole", "POST", "/api/generate", gen(format="yaml", stream=False)),
    Case("format-chat", "POST", "/api/chat", chat(format="yaml")),
    Case("embed-input-type", "POST", "/api/embed", {"model": MODEL, "input": 3}),
    Case("embed-empty-input", "POST", "/api/embed", {"model": MODEL, "input": ""}),
    # answers (layout only: the text differs)
    Case("load-generate", "POST", "/api/generate", {"model": MODEL}, exact=False),
    Case("load-chat-streaming", "POST", "/api/chat", {"model": MODEL, "stream": True},
         exact=False),
    Case("unload-generate", "POST", "/api/generate", {"model": MODEL, "keep_alive": 0},
         exact=False),
    Case("unload-chat", "POST", "/api/chat", {"model": MODEL, "keep_alive": "0s"}, exact=False),
    Case("generate-stream", "POST", "/api/generate", gen(options={"num_predict": 3}),
         exact=False),
    Case("generate-stream-one-token", "POST", "/api/generate", gen(options={"num_predict": 1}),
         exact=False),
    Case("chat-stream", "POST", "/api/chat", chat(options={"num_predict": 2}), exact=False),
    Case("generate-whole", "POST", "/api/generate",
         gen(stream=False, options={"num_predict": 2}), exact=False),
    Case("generate-whole-raw", "POST", "/api/generate",
         gen(raw=True, stream=False, options={"num_predict": 1}), exact=False),
    Case("chat-whole", "POST", "/api/chat", chat(stream=False, options={"num_predict": 2}),
         exact=False),
    Case("embed-576", "POST", "/api/embed", {"model": MODEL, "input": "hello world"},
         exact=False),
    Case("embed-dimensions", "POST", "/api/embed",
         {"model": MODEL, "input": ["a", "b"], "dimensions": 4}, exact=False),
]

#: Values (not only types) that must agree on answers.
VALUE_KEYS = ("model", "name", "done", "done_reason", "eval_count", "role", "details")


def layout(value: Any) -> Any:
    """Keys in order and value types, recursively (lists: the layout of their first item)."""
    if isinstance(value, dict):
        return [(k, layout(v)) for k, v in value.items()]
    if isinstance(value, list):
        return ["list", layout(value[0])] if value else ["list"]
    return type(value).__name__


def values(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (v if k in VALUE_KEYS else values(v)) for k, v in value.items()
                if k in VALUE_KEYS or isinstance(v, dict | list)}
    if isinstance(value, list):
        return [values(v) for v in value[:1]]
    return None


@dataclass
class Seen:
    status: int
    content_type: str | None
    framing: str
    allow: str | None
    body: bytes

    def objects(self) -> list[Any]:
        return [orjson.loads(line) for line in self.body.split(b"\n") if line.strip()]


async def send(client: httpx.AsyncClient, case: Case) -> Seen:
    kwargs: dict[str, Any] = {"headers": dict(case.headers)}
    if isinstance(case.body, bytes):
        kwargs["content"] = case.body
    elif case.body is not None:
        kwargs["content"] = orjson.dumps(case.body)
    if case.method == "POST":
        kwargs["headers"].setdefault("Content-Type", "application/json")
    response = await client.request(case.method, case.path, **kwargs)
    chunked = "chunked" in response.headers.get("transfer-encoding", "")
    return Seen(response.status_code, response.headers.get("content-type"),
                "chunked" if chunked else f"length {response.headers.get('content-length')}",
                response.headers.get("allow"), response.content)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=(MODEL,), capabilities={MODEL: ("completion",)},
                          version=OLLAMA_VERSION, embed_dims=576) as server:
        yield server


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_fake_answers_like_the_real_ollama(
    case: Case, real_ollama: RealOllama, fake: FakeOllama
) -> None:
    async with httpx.AsyncClient(base_url=real_ollama.url, timeout=120) as client:
        real = await send(client, case)
    async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
        ours = await send(client, case)
    assert (ours.status, ours.content_type, ours.allow) == (
        real.status, real.content_type, real.allow)
    if case.exact:
        assert ours.body == real.body
        assert ours.framing == real.framing
        return
    # Small answers carry a Content-Length, large ones are chunked: same rule, not same size.
    assert ours.framing.split()[0] == real.framing.split()[0], (ours.framing, real.framing)
    real_objects, our_objects = real.objects(), ours.objects()
    assert len(our_objects) == len(real_objects)
    for mine, theirs in zip(our_objects, real_objects, strict=True):
        assert layout(mine) == layout(theirs)
        assert values(mine) == values(theirs)
    if case.path == "/api/embed":
        for mine, theirs in zip(our_objects[0]["embeddings"], real_objects[0]["embeddings"],
                                strict=True):
            assert len(mine) == len(theirs)
            assert math.isclose(math.hypot(*mine), 1.0, abs_tol=1e-4)
            assert math.isclose(math.hypot(*theirs), 1.0, abs_tol=1e-4)
