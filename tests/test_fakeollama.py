"""The test Ollama itself: streaming, faults and disconnect detection, seen through httpx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.fakeollama import FakeOllama, Fault

TOKENS = ["Hello", ",", " world", "!", " Bye"]


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=("tiny:latest", "think-model"), tokens=TOKENS) as server:
        yield server


@pytest.fixture
async def client(ollama: FakeOllama) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=ollama.url, timeout=5.0, limits=limits) as c:
        yield c


async def _lines(
    client: httpx.AsyncClient, path: str = "/api/generate", **body: Any
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    body = {"model": "tiny", "prompt": "Why is the sky blue?"} | body
    async with client.stream("POST", path, json=body) as response:
        lines = [orjson.loads(line) async for line in response.aiter_lines() if line]
    return response, lines


async def test_stream_arrives_incrementally(ollama: FakeOllama, client: httpx.AsyncClient) -> None:
    ollama.token_delay = 0.05
    loop = asyncio.get_running_loop()
    start = loop.time()
    arrivals: list[float] = []
    chunks: list[dict[str, Any]] = []
    body = {"model": "TINY", "prompt": "Why is the sky blue?"}
    async with client.stream("POST", "/api/generate", json=body) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["transfer-encoding"] == "chunked"
        async for line in response.aiter_lines():
            arrivals.append(loop.time() - start)
            chunks.append(orjson.loads(line))
    assert len(chunks) == len(TOKENS) + 1
    assert arrivals[0] < arrivals[-1] / 3  # the first piece did not wait for the rest
    assert arrivals[-1] >= 0.9 * 0.05 * len(TOKENS)
    assert "".join(c["response"] for c in chunks) == "".join(TOKENS)
    assert chunks[0].keys() == {"model", "created_at", "response", "done"}
    assert chunks[0]["model"] == "TINY" and chunks[0]["created_at"].endswith("Z")
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["eval_count"] == len(TOKENS) and final["prompt_eval_count"] == 6
    assert final["total_duration"] >= final["eval_duration"] > 0
    assert len(final["context"]) == 5 + len(TOKENS)
    record = ollama.streams[-1]
    assert record.completed and record.chunks_sent == len(TOKENS) + 1
    assert not record.disconnected.is_set() and ollama.active_streams == 0


async def test_chat_thinking_then_content_then_tool_calls(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.thinking = ["Hmm", "."]
    ollama.tool_calls = [{"function": {"index": 0, "name": "f", "arguments": {"a": 1}}}]
    messages = [{"role": "user", "content": "hi there"}]
    _, chunks = await _lines(
        client, "/api/chat", model="think-model", messages=messages, think=True
    )
    parts = [c["message"] for c in chunks]
    assert [m.get("thinking", "") for m in parts[:2]] == ["Hmm", "."]
    assert "".join(m["content"] for m in parts) == "".join(TOKENS)
    assert parts[-2] == {"role": "assistant", "content": "", "tool_calls": ollama.tool_calls}
    assert chunks[-1]["done"] is True and "context" not in chunks[-1]
    assert chunks[-1]["eval_count"] == len(TOKENS) + 2


async def test_error_after_sends_an_error_line(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.set_fault(Fault(error_after=2, message="boom"))
    response, chunks = await _lines(client)
    assert response.status_code == 200
    assert [c.get("response") for c in chunks[:2]] == TOKENS[:2]
    assert chunks[2:] == [{"error": "boom"}]
    assert not ollama.streams[-1].completed


async def test_drop_after_breaks_the_connection(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.set_fault(Fault(drop_after=2, times=1))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await _lines(client)
    record = ollama.streams[-1]
    assert record.chunks_sent == 2 and not record.completed
    assert not record.disconnected.is_set()  # the server closed it, not the client
    _, chunks = await _lines(client)  # times=1: the next request is served normally
    assert chunks[-1]["done"] is True


async def test_truncate_after_ends_cleanly_without_done(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.set_fault(Fault(truncate_after=3))
    _, chunks = await _lines(client)
    assert [c["response"] for c in chunks] == TOKENS[:3]


async def test_client_close_is_seen_promptly(ollama: FakeOllama, client: httpx.AsyncClient) -> None:
    ollama.token_delay = 1.0  # the next chunk is far away: detection must not wait for it
    loop = asyncio.get_running_loop()
    body = {"model": "tiny", "prompt": "p"}
    async with client.stream("POST", "/api/generate", json=body) as response:
        async for _ in response.aiter_lines():
            break
        closed_at = loop.time()
    seen_at = await ollama.wait_for_disconnect(timeout=2.0)
    assert seen_at - closed_at < 0.2
    record = ollama.streams[-1]
    assert record.chunks_sent == 1 and not record.completed
    await asyncio.sleep(0.01)
    assert ollama.active_streams == 0 and record.ended_at is not None


async def test_hang_until_the_client_gives_up(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.set_fault(Fault(hang=True))
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/api/generate", json={"model": "tiny", "prompt": "p"}, timeout=0.2)
    await ollama.wait_for_disconnect(timeout=2.0)
    assert ollama.streams[-1].chunks_sent == 0


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    cases = [
        ("/api/generate", {"model": "nope", "prompt": "p"}, "model 'nope' not found"),
        ("/api/chat", {"model": "nope", "messages": []}, "model 'nope' not found"),
        (
            "/api/embed",
            {"model": "nope", "input": "a"},
            'model "nope" not found, try pulling it first',
        ),
    ]
    for path, body, message in cases:
        response = await client.post(path, json=body)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        assert response.content == orjson.dumps({"error": message})


async def test_validation_errors_like_ollama(client: httpx.AsyncClient) -> None:
    async def error(body: Any, path: str = "/api/generate") -> tuple[int, str]:
        response = await client.post(path, content=orjson.dumps(body))
        return response.status_code, response.json()["error"]

    base = {"model": "tiny", "prompt": "p"}
    assert await error(base | {"options": {"temperature": "hot"}}) == (
        500,
        'option "temperature" must be of type float32',
    )
    assert (await error(base | {"options": {"stop": "x"}}))[0] == 500
    assert await error(base | {"think": True}) == (400, '"tiny" does not support thinking')
    assert await error(base | {"top_logprobs": 21}) == (
        400,
        "top_logprobs must be between 0 and 20",
    )
    assert (await error(base | {"format": "xml"}))[1].startswith("invalid format: ")
    assert await error({"model": "", "messages": []}, "/api/chat") == (400, "model is required")
    response = await client.post("/api/generate", content=b"")
    assert (response.status_code, response.json()) == (400, {"error": "missing request body"})


async def test_empty_prompt_is_a_load_object(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/generate", json={"model": "tiny", "prompt": ""})
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert not response.content.endswith(b"\n")
    body = response.json()
    assert body.keys() == {"model", "created_at", "response", "done", "done_reason"}
    assert (body["response"], body["done"], body["done_reason"]) == ("", True, "load")
    response = await client.post("/api/chat", json={"model": "tiny", "keep_alive": "0s"})
    assert response.json()["message"] == {"role": "assistant", "content": ""}
    assert response.json()["done_reason"] == "unload"


async def test_num_predict_stops_with_length(client: httpx.AsyncClient) -> None:
    _, chunks = await _lines(client, options={"num_predict": 2})
    assert [c["response"] for c in chunks[:-1]] == TOKENS[:2]
    assert chunks[-1]["done_reason"] == "length" and chunks[-1]["eval_count"] == 2


async def test_non_streaming_and_other_endpoints(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    ollama.final_text = " (end)"
    body = (
        await client.post("/api/generate", json={"model": "tiny", "prompt": "p", "stream": False})
    ).json()
    assert body["response"] == "".join(TOKENS) + " (end)" and body["done"] is True
    assert (await client.get("/")).text == "Ollama is running"
    assert (await client.get("/api/version")).json() == {"version": "0.20.0"}
    tags = (await client.get("/api/tags")).json()["models"]
    assert [m["name"] for m in tags] == ["tiny:latest", "think-model:latest"]
    assert tags[0]["details"]["quantization_level"] == "Q4_1"
    embed = (await client.post("/api/embed", json={"model": "tiny", "input": ["a", "b"]})).json()
    assert len(embed["embeddings"]) == 2 and len(embed["embeddings"][0]) == 8
    assert abs(sum(v * v for v in embed["embeddings"][0]) - 1) < 1e-5
    assert (await client.get("/api/nope")).text == "404 page not found"
    assert (await client.get("/api/generate")).status_code == 405
    assert (await client.get("/", headers={"Host": "example.com"})).status_code == 403
    assert ollama.connections_accepted == 1  # all of that over one kept-alive connection


async def test_status_fault_counts_down(ollama: FakeOllama, client: httpx.AsyncClient) -> None:
    ollama.set_fault(Fault(status=503, message="busy", times=2))
    for _ in range(2):
        response = await client.get("/api/tags")
        assert (response.status_code, response.json()) == (503, {"error": "busy"})
    assert ollama.fault is None
    assert (await client.get("/api/tags")).status_code == 200


async def test_go_down_and_come_up_on_the_same_port(
    ollama: FakeOllama, client: httpx.AsyncClient
) -> None:
    url = ollama.url
    await ollama.go_down()
    assert ollama.down
    with pytest.raises(httpx.ConnectError):
        await client.get("/")
    await ollama.come_up()
    assert not ollama.down and ollama.url == url
    assert (await client.get("/")).status_code == 200


async def test_many_concurrent_streams(ollama: FakeOllama, client: httpx.AsyncClient) -> None:
    ollama.token_delay = 0.02

    async def one(i: int) -> str:
        _, chunks = await _lines(client, prompt=f"p{i}")
        assert chunks[-1]["done"] is True
        return "".join(c["response"] for c in chunks)

    results = await asyncio.gather(*(one(i) for i in range(120)))
    assert results == ["".join(TOKENS)] * 120
    assert ollama.max_active_streams >= 100 and ollama.active_streams == 0
    assert all(s.completed for s in ollama.streams)
