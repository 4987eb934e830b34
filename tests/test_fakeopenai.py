"""The OpenAI-compatible fake itself: every fault writes the bytes it claims, read off a raw
socket (HTTP chunks and socket reads as they arrived) or through httpx."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson
import pytest

from tests.fakeopenai import DEFAULT_TOKENS, FakeOpenAI, Fault, ToolCall, sse_events

USER = [{"role": "user", "content": "Why is the sky blue?"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, "stream": True} | fields


@dataclass
class Raw:
    """A response as read off the socket."""

    status: int
    headers: dict[str, str]
    head: bytes
    chunks: list[bytes] = field(default_factory=list)
    #: (seconds since the request went out, bytes) for every socket read of the body
    reads: list[tuple[float, bytes]] = field(default_factory=list)
    #: The chunked body ended with its terminating chunk (not cut by a closed connection).
    clean_end: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def events(self) -> list[tuple[str | None, str]]:
        return sse_events(self.body)

    def objects(self) -> list[Any]:
        return [orjson.loads(d) for _, d in self.events() if d != "[DONE]"]


async def raw_request(
    fake: FakeOpenAI, body: Any, path: str = "/v1/chat/completions", method: str = "POST"
) -> Raw:
    """Sends one request and reads its answer byte for byte (Connection: close)."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    start = time.monotonic()
    writer.write(head.encode() + payload)
    data = b""
    reads: list[tuple[float, bytes]] = []
    try:
        async with asyncio.timeout(10):
            while piece := await reader.read(65536):
                data += piece
                reads.append((time.monotonic() - start, piece))
    except ConnectionResetError:
        pass
    finally:
        writer.close()
        await writer.wait_closed()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    raw = Raw(int(lines[0].split()[1]), headers, head_bytes, reads=reads)
    if "chunked" not in headers.get("transfer-encoding", ""):
        raw.chunks = [rest]
        raw.clean_end = True
        return raw
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            raw.clean_end = True
            break
        if len(rest) < size + 2:
            break
        raw.chunks.append(rest[:size])
        rest = rest[size + 2 :]
    return raw


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def contents(objects: list[Any]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or "" for o in objects for c in o["choices"]
    )


# -- the normal answer, per dialect ------------------------------------------------------------


async def test_openai_stream_with_usage(fake: FakeOpenAI) -> None:
    raw = await raw_request(fake, chat(stream_options={"include_usage": True}))
    assert raw.status == 200 and raw.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert raw.clean_end
    events = raw.events()
    assert events[-1] == (None, "[DONE]")
    objects = raw.objects()
    assert objects[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }
    assert contents(objects) == "".join(DEFAULT_TOKENS)
    assert objects[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(o["usage"] is None for o in objects[:-1])
    last = objects[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(DEFAULT_TOKENS)
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + len(DEFAULT_TOKENS)
    assert len({o["id"] for o in objects}) == 1 and len({o["created"] for o in objects}) == 1
    assert {o["object"] for o in objects} == {"chat.completion.chunk"}
    # one event per HTTP chunk, each "data: <json>\n\n"
    assert len(raw.chunks) == len(events)
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in raw.chunks)


async def test_openai_stream_without_usage_has_no_usage_key(fake: FakeOpenAI) -> None:
    objects = (await raw_request(fake, chat())).objects()
    assert all("usage" not in o for o in objects)
    assert objects[-1]["choices"][0]["finish_reason"] == "stop"


async def test_ollama_dialect_packs_the_tail_into_one_write() -> None:
    async with FakeOpenAI(dialect="ollama", tokens=["a", "<b>"]) as fake:
        raw = await raw_request(fake, chat(stream_options={"include_usage": True}))
    assert raw.headers["content-type"] == "text/event-stream"
    assert [len(sse_events(c)) for c in raw.chunks] == [1, 1, 3]  # final + usage + [DONE]
    objects = raw.objects()
    assert [o["choices"][0]["delta"] for o in objects[:2]] == [
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "<b>"},
    ]
    assert b"\\u003cb\\u003e" in raw.body  # Go's HTML-safe JSON
    assert objects[2]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": "stop",
    }
    assert objects[3]["choices"] == [] and objects[3]["system_fingerprint"] == "fp_ollama"
    assert list(objects[3]) == [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
    ]


async def test_ollama_completions_carry_zero_usage_until_the_end() -> None:
    async with FakeOpenAI(dialect="ollama", tokens=["a", "b"]) as fake:
        body = {
            "model": "tiny",
            "prompt": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        objects = (await raw_request(fake, body, "/v1/completions")).objects()
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert [o["usage"] for o in objects[:-1]] == [zero] * 3
    assert objects[-1]["usage"]["completion_tokens"] == 2 and objects[-1]["choices"] == []


async def test_llama_cpp_python_dialect() -> None:
    async with FakeOpenAI(dialect="llama-cpp-python", tokens=["é"]) as fake:
        raw = await raw_request(
            fake, chat(model="anything", stream_options={"include_usage": True})
        )
    objects = raw.objects()
    assert raw.chunks[0].startswith(b'data: {"id": "chatcmpl-')  # Python's json.dumps
    assert b"\\u00e9" in raw.body  # ensure_ascii
    assert [o["choices"][0]["delta"] for o in objects] == [
        {"role": "assistant"},
        {"content": "é"},
        {},
    ]
    assert objects[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in o for o in objects)  # include_usage is ignored
    assert {o["model"] for o in objects} == {"anything"}  # any model name is served
    assert raw.chunks[-1] == b"data: [DONE]\n\n"


async def test_whole_answers() -> None:
    for dialect, newline in (("openai", False), ("ollama", True), ("llama-cpp-python", False)):
        async with FakeOpenAI(dialect=dialect, tokens=["a", "b", "c"]) as fake:  # type: ignore[arg-type]
            raw = await raw_request(fake, chat(stream=False, max_tokens=2))
        assert raw.status == 200 and raw.headers["content-type"] == "application/json"
        assert raw.body.endswith(b"\n") is newline
        obj = orjson.loads(raw.body)
        assert obj["object"] == "chat.completion"
        assert obj["choices"][0]["message"]["content"] == "ab"
        assert obj["choices"][0]["finish_reason"] == "length"
        assert obj["usage"]["completion_tokens"] == 2


# -- framing faults --------------------------------------------------------------------------


async def test_split_writes_cut_events_at_odd_places(fake: FakeOpenAI) -> None:
    plain = await raw_request(fake, chat())
    fake.set_fault(Fault(split_every=7, split_delay=0.005))
    split = await raw_request(fake, chat())
    assert max(len(c) for c in split.chunks) == 7
    assert len(split.chunks) > 4 * len(plain.chunks)
    # the pieces went out as separate writes: far more socket reads than events
    assert len(split.reads) > len(split.events())
    # cuts fall inside "data:" and between the two "\n" that end an event
    assert any(c.endswith((b"d", b"da", b"dat", b"data")) for c in split.chunks)
    assert any(c.endswith(b"}\n") for c in split.chunks)
    assert contents(split.objects()) == contents(plain.objects())
    # a cut inside the three UTF-8 bytes of "–" (ids and times have a fixed width)
    dash = plain.body.index("–".encode())
    fake.set_fault(Fault(split_every=dash + 1))
    cut = await raw_request(fake, chat())
    assert [_cuts_utf8(c) for c in cut.chunks].count(True) == 2  # the piece before and after
    assert any(c.endswith(b"\xe2") for c in cut.chunks)
    assert contents(cut.objects()) == contents(plain.objects())


def _cuts_utf8(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
async def test_line_endings(fake: FakeOpenAI, newline: str) -> None:
    fake.set_fault(Fault(newline=newline))  # type: ignore[arg-type]
    raw = await raw_request(fake, chat())
    nl = newline.encode()
    assert all(c.endswith(nl + nl) for c in raw.chunks)
    if newline == "\r":
        assert b"\n" not in raw.body
    else:
        assert raw.body.count(b"\n") == raw.body.count(b"\r\n")
    assert contents(raw.objects()) == "".join(DEFAULT_TOKENS)
    assert raw.events()[-1][1] == "[DONE]"


async def test_comments_between_events(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(comment_every=3))
    raw = await raw_request(fake, chat())
    comments = [c for c in raw.chunks if c.startswith(b": keepalive\n\n")]
    events = len(raw.events()) - 1  # [DONE] gets no comment
    assert len(comments) == (events + 2) // 3
    assert raw.chunks[0].startswith(b": keepalive\n\ndata: ")
    assert contents(raw.objects()) == "".join(DEFAULT_TOKENS)


async def test_multiple_data_lines_in_one_event(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(multiline_data=True))
    raw = await raw_request(fake, chat())
    first = raw.chunks[0]
    assert first.count(b"data: ") > 5 and first.endswith(b"}\n\n")
    assert raw.chunks[-1] == b"data: [DONE]\n\n"
    assert contents(raw.objects()) == "".join(DEFAULT_TOKENS)


# -- how a stream ends -------------------------------------------------------------------------


async def test_omit_done_keeps_the_finish_reason(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(omit_done=True))
    raw = await raw_request(fake, chat(stream_options={"include_usage": True}))
    assert raw.clean_end and all(d != "[DONE]" for _, d in raw.events())
    objects = raw.objects()
    assert objects[-2]["choices"][0]["finish_reason"] == "stop" and objects[-1]["usage"]


@pytest.mark.parametrize("done", [False, True])
async def test_truncated_stream_has_no_finish_reason(fake: FakeOpenAI, done: bool) -> None:
    fake.set_fault(Fault(truncate_after=3, done_on_truncate=done))
    raw = await raw_request(fake, chat())
    assert raw.clean_end
    assert [d == "[DONE]" for _, d in raw.events()] == [False] * 3 + [True] * done
    assert all(c["finish_reason"] is None for o in raw.objects() for c in o["choices"])
    assert fake.streams[-1].chunks_sent == 3 and not fake.streams[-1].completed


@pytest.mark.parametrize("style", ["data", "event"])
async def test_error_after_http_200(fake: FakeOpenAI, style: str) -> None:
    fake.set_fault(Fault(error_after=2, error_style=style, message="boom"))  # type: ignore[arg-type]
    raw = await raw_request(fake, chat())
    assert raw.status == 200 and raw.clean_end
    events = raw.events()
    assert len(events) == 3
    name, data = events[-1]
    assert name == ("error" if style == "event" else None)
    assert orjson.loads(data)["error"]["message"] == "boom"
    if style == "event":
        assert raw.chunks[-1].startswith(b"event: error\ndata: {")


async def test_drop_after_cuts_the_connection(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(drop_after=2))
    raw = await raw_request(fake, chat())
    assert not raw.clean_end and len(raw.events()) == 2
    async with httpx.AsyncClient(base_url=fake.url) as client:
        fake.set_fault(Fault(drop_after=2))
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/chat/completions", json=chat()) as response:
                async for _ in response.aiter_bytes():
                    pass


async def test_hang_after_and_disconnect_seen_at_once(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(hang_after=2))
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    payload = orjson.dumps(chat())
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        b"Content-Type: application/json\r\n\r\n%s" % (len(payload), payload)
    )
    seen = b""
    while seen.count(b"data: ") < 2:
        seen += await reader.read(65536)
    closed = asyncio.get_running_loop().time()
    writer.close()
    await writer.wait_closed()
    gone = await fake.wait_for_disconnect()
    assert gone - closed < 0.5
    assert fake.streams[-1].chunks_sent == 2


async def test_hang_before_headers(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(hang=True))
    async with httpx.AsyncClient(base_url=fake.url) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/v1/models", timeout=0.3)


async def test_delay_first_and_token_delay() -> None:
    async with FakeOpenAI(
        dialect="llama-cpp-python", tokens=["a", "b", "c"], token_delay=0.05
    ) as fake:
        fake.set_fault(Fault(delay_first=0.3))
        raw = await raw_request(fake, chat())
    # headers early (uvicorn), first event after the delay, then one every 50 ms
    assert raw.reads[0][1].endswith(b"\r\n\r\n") and raw.reads[0][0] < 0.2
    data_times = [t for t, piece in raw.reads if b"data: {" in piece]
    assert data_times[0] >= 0.3
    assert data_times[-1] - data_times[0] >= 0.9 * 0.05 * 4


async def test_client_disconnect_stops_a_slow_stream() -> None:
    async with FakeOpenAI(token_delay=10.0) as fake, httpx.AsyncClient(base_url=fake.url) as c:
        async with c.stream("POST", "/v1/chat/completions", json=chat()) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break
        start = asyncio.get_running_loop().time()
        gone = await fake.wait_for_disconnect(timeout=2.0)
        assert gone - start < 0.5
        assert fake.streams[-1].chunks_sent == 1 and fake.active_streams == 0


# -- errors before the stream --------------------------------------------------------------------


async def test_error_shapes(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(status=400, message="bad", error_code="invalid_value", error_param="x"))
    raw = await raw_request(fake, chat())
    assert (raw.status, raw.headers["content-type"]) == (400, "application/json")
    assert orjson.loads(raw.body) == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "x",
            "code": "invalid_value",
        }
    }
    fake.set_fault(Fault(status=400, message="bad", error_shape="flat"))
    assert orjson.loads((await raw_request(fake, chat())).body) == {
        "object": "error",
        "message": "bad",
        "type": "invalid_request_error",
        "param": None,
        "code": 400,
    }
    fake.set_fault(Fault(status=500, message="oops", error_shape="vllm"))
    assert orjson.loads((await raw_request(fake, chat())).body) == {
        "error": {"message": "oops", "type": "server_error", "param": None, "code": 500}
    }


async def test_rate_limits(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault.rate_limited(retry_after="2", retry_after_ms=1500))
    raw = await raw_request(fake, chat())
    assert raw.status == 429
    assert raw.headers["retry-after"] == "2" and raw.headers["retry-after-ms"] == "1500"
    assert orjson.loads(raw.body)["error"]["code"] == "rate_limit_exceeded"
    fake.set_fault(Fault.rate_limited(retry_after=Fault.http_date(30)))
    raw = await raw_request(fake, chat())
    when = parsedate_to_datetime(raw.headers["retry-after"]).timestamp()
    assert 25 < when - time.time() <= 31
    fake.set_fault(Fault.quota_exhausted())
    raw = await raw_request(fake, chat())
    error = orjson.loads(raw.body)["error"]
    assert raw.status == 429 and "retry-after" not in raw.headers
    assert error["code"] == error["type"] == "insufficient_quota"


async def test_loading_model_on_every_path(fake: FakeOpenAI) -> None:
    assert (await raw_request(fake, b"", "/health", "GET")).body == b'{"status":"ok"}'
    fake.set_fault(Fault.loading())
    for path, method in (
        ("/health", "GET"),
        ("/v1/models", "GET"),
        ("/v1/chat/completions", "POST"),
    ):
        raw = await raw_request(fake, chat() if method == "POST" else b"", path, method)
        assert raw.status == 503, path
        assert raw.body == (
            b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
        )


async def test_times_and_paths(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(status=500, times=1, paths=("/v1/completions",)))
    assert (await raw_request(fake, chat())).status == 200  # other path: no match, not counted
    body = {"model": "tiny", "prompt": "x"}
    assert (await raw_request(fake, body, "/v1/completions")).status == 500
    assert (await raw_request(fake, body, "/v1/completions")).status == 200
    assert fake.fault is None


async def test_whole_answer_error_after(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault(error_after=1, message="died"))
    raw = await raw_request(fake, chat(stream=False))
    assert raw.status == 500 and orjson.loads(raw.body)["error"]["message"] == "died"


# -- tool calls, reasoning, finish reasons ------------------------------------------------------

CALLS = [
    ToolCall("get_weather", '{"city": "Paris"}', "call_a"),
    ToolCall("get_time", '{"tz": "CET"}', "call_b"),
]
TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]


async def tool_deltas(fake: FakeOpenAI, style: str) -> tuple[list[Any], str | None]:
    fake.tokens, fake.tool_calls, fake.tool_call_style = [], list(CALLS), style  # type: ignore[assignment]
    objects = (await raw_request(fake, chat(tools=TOOLS))).objects()
    deltas = [t for o in objects for c in o["choices"] for t in c["delta"].get("tool_calls", [])]
    finish = objects[-1]["choices"][0]["finish_reason"]
    return deltas, finish


async def test_tool_calls_indexed(fake: FakeOpenAI) -> None:
    deltas, finish = await tool_deltas(fake, "indexed")
    assert finish == "tool_calls"
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        entry = calls.setdefault(d["index"], {"id": "", "name": "", "arguments": ""})
        entry["id"] += d.get("id", "")
        entry["name"] += d.get("function", {}).get("name", "")
        entry["arguments"] += d["function"]["arguments"]
    assert calls == {
        0: {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "call_b", "name": "get_time", "arguments": '{"tz": "CET"}'},
    }
    assert len(deltas) > 4  # arguments really arrive in pieces


async def test_tool_calls_broken_styles(fake: FakeOpenAI) -> None:
    deltas, _ = await tool_deltas(fake, "no_index")
    assert [("index" in d, d["id"], d["function"]["arguments"]) for d in deltas] == [
        (False, "call_a", '{"city": "Paris"}'),
        (False, "call_b", '{"tz": "CET"}'),
    ]
    deltas, _ = await tool_deltas(fake, "repeated")  # llama-cpp-python: names repeat
    assert {(d["index"], d["id"], d["function"]["name"]) for d in deltas} == {
        (0, "call_a", "get_weather"),
        (1, "call_b", "get_time"),
    }
    assert "".join(d["function"]["arguments"] for d in deltas if d["index"] == 0) == (
        '{"city": "Paris"}'
    )
    deltas, _ = await tool_deltas(fake, "index0")
    assert {d["index"] for d in deltas} == {0}
    assert [d["id"] for d in deltas if "id" in d] == ["call_a", "call_b"]
    deltas, _ = await tool_deltas(fake, "object_args")
    assert [d["function"]["arguments"] for d in deltas] == [{"city": "Paris"}, {"tz": "CET"}]
    deltas, _ = await tool_deltas(fake, "whole")
    assert [d["index"] for d in deltas] == [0, 1]  # both in one chunk
    objects = (await raw_request(fake, chat(tools=TOOLS))).objects()
    assert sum("tool_calls" in o["choices"][0]["delta"] for o in objects) == 1


async def test_tool_calls_whole_answer_and_forced_stop(fake: FakeOpenAI) -> None:
    fake.tokens, fake.tool_calls = [], list(CALLS)
    obj = orjson.loads((await raw_request(fake, chat(tools=TOOLS, stream=False))).body)
    message = obj["choices"][0]["message"]
    assert message["content"] is None and obj["choices"][0]["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    fake.finish_reason = "stop"  # as gpt-4o and Gemini's compat layer do
    objects = (await raw_request(fake, chat(tools=TOOLS))).objects()
    assert objects[-1]["choices"][0]["finish_reason"] == "stop"
    fake.finish_reason = None
    objects = (await raw_request(fake, chat())).objects()  # no tools in the request: no calls
    assert all("tool_calls" not in o["choices"][0]["delta"] for o in objects)


@pytest.mark.parametrize(
    ("dialect", "name"), [("openai", "reasoning_content"), ("ollama", "reasoning")]
)
async def test_reasoning_deltas(dialect: str, name: str) -> None:
    async with FakeOpenAI(dialect=dialect, tokens=["A"]) as fake:  # type: ignore[arg-type]
        fake.reasoning = ["Let", " me", " think"]
        objects = (await raw_request(fake, chat(stream_options={"include_usage": True}))).objects()
        whole = orjson.loads((await raw_request(fake, chat(stream=False))).body)
    thinking = "".join(o["choices"][0]["delta"].get(name, "") for o in objects if o["choices"])
    assert thinking == "Let me think" and contents(objects) == "A"
    assert whole["choices"][0]["message"][name] == "Let me think"
    if dialect == "openai":
        assert objects[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3


@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls", "content_filter"])
async def test_forced_finish_reasons(fake: FakeOpenAI, reason: str) -> None:
    fake.finish_reason = reason
    objects = (await raw_request(fake, chat())).objects()
    assert objects[-1]["choices"][0]["finish_reason"] == reason


async def test_max_tokens_gives_length(fake: FakeOpenAI) -> None:
    objects = (await raw_request(fake, chat(max_tokens=2))).objects()
    assert contents(objects) == "".join(DEFAULT_TOKENS[:2])
    assert objects[-1]["choices"][0]["finish_reason"] == "length"


# -- validation and the other endpoints --------------------------------------------------------


async def test_context_overflow_per_dialect() -> None:
    long = chat(messages=[{"role": "user", "content": "w " * 50}], max_tokens=2)
    for dialect, stream, status, events in (
        ("openai", False, 400, None),
        ("llama-cpp-python", False, 400, None),
        ("llama-cpp-python", True, 200, 0),
        ("ollama", True, 200, 4),
    ):
        async with FakeOpenAI(dialect=dialect, models=("tiny",)) as fake:  # type: ignore[arg-type]
            fake.context_window = 20
            raw = await raw_request(fake, long | {"stream": stream})
        assert raw.status == status, dialect
        if events is None:
            assert orjson.loads(raw.body)["error"]["code"] == "context_length_exceeded"
        else:
            assert len(raw.events()) == events, dialect


async def test_ollama_validation_order_and_texts() -> None:
    async with FakeOpenAI(dialect="ollama", models=("smollm2:135m",)) as fake:
        fake.tools_supported = False
        cases = [
            (b'{"model":', 400, "unexpected EOF", "application/json; charset=utf-8"),
            ({"model": "smollm2:135m"}, 400, "[] is too short - 'messages'", None),
            ({"model": "x", "messages": USER}, 404, "model 'x' not found", "application/json"),
            (
                {"model": "smollm2:135m", "messages": USER, "temperature": "hot"},
                400,
                "json: cannot unmarshal string into Go struct field ChatCompletionRequest"
                ".temperature of type float64",
                None,
            ),
            (
                {"model": "smollm2:135m", "messages": USER, "tools": TOOLS},
                400,
                "registry.ollama.ai/library/smollm2:135m does not support tools",
                None,
            ),
        ]
        for body, status, message, content_type in cases:
            raw = await raw_request(fake, body)
            assert raw.status == status
            assert orjson.loads(raw.body)["error"]["message"] == message
            if content_type:
                assert raw.headers["content-type"] == content_type


async def test_models_and_embeddings() -> None:
    async with FakeOpenAI(dialect="ollama", models=("a", "b"), embed_dims=600) as fake:
        models = orjson.loads((await raw_request(fake, b"", "/v1/models", "GET")).body)
        assert [m["id"] for m in models["data"]] == ["a", "b"]
        raw = await raw_request(fake, {"model": "a", "input": ["x", "y z"]}, "/v1/embeddings")
        assert raw.headers.get("transfer-encoding") == "chunked"  # over Go's 2 KiB buffer
        data = orjson.loads(raw.body)
        assert [len(d["embedding"]) for d in data["data"]] == [600, 600]
        assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        raw = await raw_request(
            fake, {"model": "a", "input": "x", "encoding_format": "base64"}, "/v1/embeddings"
        )
        assert isinstance(orjson.loads(raw.body)["data"][0]["embedding"], str)
        assert (await raw_request(fake, b"", "/v1/models/zz", "GET")).status == 404
