"""``tokenwire.langchain.ChatTokenwire`` against an in-process gateway and the test Ollama:
streaming, usage, stop sequences, options, tools, cancellation and errors.

The async entry points run in the test's loop, like the gateway; the blocking ones
(``invoke``, ``stream``) run in a worker thread (``asyncio.to_thread``), because a blocking
client must not block the loop of the server it calls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel

from tests.conftest import MakeRuntime
from tests.fakeollama import DEFAULT_TOKENS, FakeOllama, Fault
from tests.helpers import last_body, samples, scrape, value
from tokenwire.client import DeadlineExceeded, NotFound, TokenwireError, Unavailable
from tokenwire.langchain import ChatTokenwire
from tokenwire.langchain._chat import _service_config
from tokenwire.langchain._messages import chunk_message, to_messages
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb

ANSWER = "".join(DEFAULT_TOKENS)
README = Path(__file__).resolve().parents[2] / "README.md"
QUESTION = [SystemMessage("Answer briefly."), HumanMessage("Why is the sky blue?")]


@pytest.fixture
async def metered(make_runtime: MakeRuntime) -> Runtime:
    return await make_runtime(metrics_listen="127.0.0.1:0")


@pytest.fixture
async def chat(metered: Runtime) -> AsyncIterator[ChatTokenwire]:
    model = ChatTokenwire(model="tiny", target=metered.target, max_retries=0)
    yield model
    await model.aclose()
    model.close()


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Recorder(BaseCallbackHandler):
    """Collects what LangChain's callbacks saw."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.errors: list[BaseException] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:  # type: ignore[override]
        self.tokens.append(token)

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.errors.append(error)


def joined(chunks: Sequence[BaseMessage]) -> AIMessageChunk:
    """The chunks of a stream added up, as LangChain does."""
    parts = [c for c in chunks if isinstance(c, AIMessageChunk)]
    assert len(parts) == len(chunks)
    full = parts[0]
    for chunk in parts[1:]:
        full = full + chunk
    return full


def check_final(message: AIMessage, fake: FakeOllama, output_tokens: int) -> None:
    usage = message.usage_metadata
    assert usage is not None
    assert usage["output_tokens"] == output_tokens
    assert usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    meta = message.response_metadata
    assert meta["finish_reason"] == "stop" and meta["model_name"] == "tiny"
    assert meta["model_provider"] == "tokenwire" and meta["upstream"] == "ollama"


async def chat_calls(runtime: Runtime, code: str) -> float:
    assert runtime.metrics_port is not None
    found = samples((await scrape(runtime.metrics_port)).text)
    return value(found, "tokenwire_rpcs_total", method="Chat", code=code)


# -- streaming -------------------------------------------------------------------------------


async def test_astream_hands_on_each_token_as_it_arrives(chat: ChatTokenwire,
                                                         fake: FakeOllama) -> None:
    fake.token_delay = 0.05
    recorder = Recorder()
    chunks: list[AIMessageChunk] = []
    async for chunk in chat.astream(QUESTION, config={"callbacks": [recorder]}):
        if not chunks:  # the first word is here while the engine is still generating
            assert not fake.streams[-1].completed
            assert fake.streams[-1].chunks_sent < len(DEFAULT_TOKENS)
        chunks.append(chunk)
    assert [c.content for c in chunks[:-1]] == list(DEFAULT_TOKENS)
    assert recorder.tokens == [*DEFAULT_TOKENS, ""]
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert all(c.usage_metadata is None for c in chunks[:-1])
    full = joined(chunks)
    assert full.content == ANSWER
    check_final(full, fake, len(DEFAULT_TOKENS))
    assert full.response_metadata["request_id"]
    body = last_body(fake, "/api/chat")
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


async def test_stream_in_a_thread_streams_too(chat: ChatTokenwire, fake: FakeOllama) -> None:
    fake.token_delay = 0.02
    chunks = await asyncio.to_thread(lambda: list(chat.stream(QUESTION)))
    assert [c.content for c in chunks[:-1]] == list(DEFAULT_TOKENS)
    full = joined(chunks)
    check_final(full, fake, len(DEFAULT_TOKENS))


async def test_invoke_and_ainvoke_return_the_whole_answer_with_usage(
        chat: ChatTokenwire, fake: FakeOllama) -> None:
    fake.final_text = "!"
    for message in (await chat.ainvoke(QUESTION),
                    await asyncio.to_thread(chat.invoke, QUESTION)):
        assert isinstance(message, AIMessage)
        assert message.content == ANSWER + "!"
        check_final(message, fake, len(DEFAULT_TOKENS))


async def test_streaming_true_makes_invoke_stream(metered: Runtime, fake: FakeOllama) -> None:
    fake.token_delay = 0.02
    model = ChatTokenwire(model="tiny", target=metered.target, streaming=True)
    recorder = Recorder()
    message = await model.ainvoke(QUESTION, config={"callbacks": [recorder]})
    assert message.content == ANSWER
    assert "".join(recorder.tokens) == ANSWER and len(recorder.tokens) > 2  # as they came
    await model.aclose()


# -- options, stop, model -------------------------------------------------------------------


async def test_options_stop_and_model_reach_the_engine(chat: ChatTokenwire,
                                                       fake: FakeOllama) -> None:
    model = chat.model_copy(update={"temperature": 0.0, "seed": 7, "top_k": 5, "max_tokens": 3,
                                    "stop": ["never"], "options": {"repeat_penalty": 1.2}})
    message = await model.ainvoke(QUESTION, stop=["blue", "air"])
    options = last_body(fake, "/api/chat")["options"]
    assert options == {"temperature": 0, "seed": 7, "top_k": 5, "num_predict": 3,
                       "stop": ["blue", "air"], "repeat_penalty": 1.2}
    assert message.content == "".join(DEFAULT_TOKENS[:3])
    assert message.response_metadata["finish_reason"] == "length"

    await model.ainvoke(QUESTION)  # without a call's stop, the model's own
    assert last_body(fake, "/api/chat")["options"]["stop"] == ["never"]

    await model.ainvoke(QUESTION, model="think-model", seed=9, think=False)
    body = last_body(fake, "/api/chat")
    assert body["model"] == "think-model" and body["options"]["seed"] == 9
    assert body["think"] is False

    with pytest.raises(TypeError, match="unknown keyword argument"):
        await model.ainvoke(QUESTION, temprature=1)


async def test_model_override_shows_in_the_metadata(chat: ChatTokenwire) -> None:
    chunks = [c async for c in chat.astream("hi", model="think-model")]
    assert joined(chunks).response_metadata["model_name"] == "think-model"


# -- tools -----------------------------------------------------------------------------------


async def test_bound_tools_are_sent_and_calls_come_back(chat: ChatTokenwire,
                                                        fake: FakeOllama) -> None:
    fake.thinking = ["Adding", "."]
    fake.tool_calls = [{"function": {"index": 0, "name": "add",
                                     "arguments": {"a": 1, "b": 2}}}]
    with_tools = chat.bind_tools([add])
    message = await with_tools.ainvoke("1 + 2?", model="think-model")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("add", {"a": 1, "b": 2})]
    assert message.tool_calls[0]["id"]
    assert message.additional_kwargs["reasoning_content"] == "Adding."
    sent = last_body(fake, "/api/chat")["tools"]
    assert sent[0]["function"]["name"] == "add"
    assert list(sent[0]["function"]["parameters"]["properties"]) == ["a", "b"]

    chunks = [c async for c in with_tools.astream("1 + 2?")]
    full = joined(chunks)
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("add", {"a": 1, "b": 2})]

    # The answer goes back as a ToolMessage; its tool name is found from the call.
    call = message.tool_calls[0]
    history: list[BaseMessage] = [HumanMessage("1 + 2?"), message,
                                  ToolMessage("3", tool_call_id=call["id"])]
    await with_tools.ainvoke(history)
    sent_messages = last_body(fake, "/api/chat")["messages"]
    assert sent_messages[1]["tool_calls"][0]["function"] == {
        "index": 0, "name": "add", "arguments": {"a": 1, "b": 2}}
    assert sent_messages[2] == {"role": "tool", "content": "3", "tool_name": "add",
                                "tool_call_id": call["id"]}


async def test_tool_choice_that_cannot_be_honoured_is_refused(chat: ChatTokenwire,
                                                              fake: FakeOllama) -> None:
    with pytest.raises(ValueError, match="no tool_choice"):
        chat.bind_tools([add], tool_choice="any")
    await chat.bind_tools([add], tool_choice="none").ainvoke("hi")
    assert "tools" not in last_body(fake, "/api/chat")


class Person(BaseModel):
    """Someone."""

    name: str
    age: int


async def test_structured_output_sends_the_schema_as_the_format(chat: ChatTokenwire,
                                                                fake: FakeOllama) -> None:
    fake.tokens = ['{"name": ', '"Ann", "age"', ': 3}']
    person = await chat.with_structured_output(Person).ainvoke("Who?")
    assert person == Person(name="Ann", age=3)
    sent = last_body(fake, "/api/chat")["format"]
    assert list(sent["properties"]) == ["name", "age"] and sent["required"] == ["name", "age"]

    raw = await chat.with_structured_output(Person, method="json_mode",
                                            include_raw=True).ainvoke("Who?")
    assert last_body(fake, "/api/chat")["format"] == "json"
    assert raw["parsed"] == Person(name="Ann", age=3) and raw["parsing_error"] is None
    assert isinstance(raw["raw"], AIMessage)

    fake.tokens = ["not json"]
    broken = await chat.with_structured_output(Person, include_raw=True).ainvoke("Who?")
    assert broken["parsed"] is None and broken["parsing_error"] is not None

    fake.tokens = []
    fake.tool_calls = [{"function": {"name": "Person", "arguments": {"name": "Bo", "age": 5}}}]
    called = await chat.with_structured_output(Person, method="function_calling").ainvoke("?")
    assert called == Person(name="Bo", age=5)
    assert last_body(fake, "/api/chat")["tools"][0]["function"]["name"] == "Person"


# -- cancellation ----------------------------------------------------------------------------


async def test_leaving_astream_cancels_the_call(chat: ChatTokenwire, metered: Runtime,
                                                fake: FakeOllama) -> None:
    fake.token_delay = 0.5  # a slow model: the rest of the answer is far away
    async for chunk in chat.astream(QUESTION):
        assert chunk.content == DEFAULT_TOKENS[0]
        break
    await fake.wait_for_disconnect(timeout=5)
    assert not fake.streams[-1].completed
    assert fake.streams[-1].chunks_sent <= 2
    # The engine stopped because the gateway saw its caller cancel.
    for _ in range(20):  # the handler may still be unwinding: a few more event-loop turns
        if await chat_calls(metered, "CANCELLED") == 1:
            break
        await asyncio.sleep(0)
    assert await chat_calls(metered, "CANCELLED") == 1


async def test_leaving_stream_cancels_the_call(chat: ChatTokenwire, fake: FakeOllama) -> None:
    fake.token_delay = 0.5

    def first() -> str:
        for chunk in chat.stream(QUESTION):
            return str(chunk.content)  # leaves the loop: the generator is closed
        raise AssertionError("no chunk")

    assert await asyncio.to_thread(first) == DEFAULT_TOKENS[0]
    await fake.wait_for_disconnect(timeout=5)
    assert not fake.streams[-1].completed


async def test_a_cancelled_task_cancels_the_call(chat: ChatTokenwire, fake: FakeOllama) -> None:
    fake.token_delay = 0.5
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await chat.ainvoke(QUESTION)
    await fake.wait_for_disconnect(timeout=5)
    assert not fake.streams[-1].completed


# -- errors ----------------------------------------------------------------------------------


async def test_errors_keep_their_types(chat: ChatTokenwire, fake: FakeOllama) -> None:
    recorder = Recorder()
    config: Any = {"callbacks": [recorder]}
    with pytest.raises(NotFound, match="not installed"):
        await chat.ainvoke(QUESTION, config, model="nope")
    with pytest.raises(NotFound):
        [c async for c in chat.astream(QUESTION, config, model="nope")]
    with pytest.raises(NotFound):
        await asyncio.to_thread(lambda: list(chat.stream(QUESTION, config, model="nope")))
    assert [type(e) for e in recorder.errors] == [NotFound] * 3

    fake.set_fault(Fault(error_after=3, message="boom", times=1))
    chunks: list[AIMessageChunk] = []
    with pytest.raises(TokenwireError) as caught:
        async for chunk in chat.astream(QUESTION):
            chunks.append(chunk)
    assert "".join(str(c.content) for c in chunks) == "".join(DEFAULT_TOKENS[:3])
    assert caught.value.partial_text == "".join(DEFAULT_TOKENS[:3])


async def test_deadline_is_the_models_timeout(metered: Runtime, fake: FakeOllama) -> None:
    model = ChatTokenwire(model="tiny", target=metered.target, timeout=0.3)
    fake.set_fault(Fault(hang=True, times=1))
    with pytest.raises(DeadlineExceeded):
        await model.ainvoke(QUESTION)
    await fake.wait_for_disconnect(timeout=5)
    await model.aclose()


async def test_with_retry_retries_what_the_client_says_is_retryable(
        chat: ChatTokenwire, fake: FakeOllama) -> None:
    fake.set_fault(Fault(status=503, message="busy", times=1))
    with pytest.raises(Unavailable):
        await chat.ainvoke(QUESTION)
    fake.set_fault(Fault(status=503, message="busy", times=1))
    retrying = chat.with_retry(retry_if_exception_type=(Unavailable,),
                               stop_after_attempt=2, wait_exponential_jitter=False)
    message = await retrying.ainvoke(QUESTION)
    assert message.content == ANSWER


async def test_readme_langchain_example_runs(metered: Runtime, fake: FakeOllama) -> None:
    """The README's LangChain example (its one ```py block), run as written against the
    gateway (in a thread: it runs its own event loop)."""
    (code,) = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    code = code.replace("127.0.0.1:50051", metered.target).replace("smollm2:135m", "tiny")
    printed: list[str] = []

    def fake_print(*args: object, **kwargs: object) -> None:
        printed.append(" ".join(map(str, args)) + str(kwargs.get("end", "\n")))

    await asyncio.to_thread(exec, code, {"print": fake_print, "__name__": "readme"})
    assert "".join(printed) == ANSWER + "\n"
    assert len(printed) > 2  # streamed in pieces
    sent = last_body(fake, "/api/chat")
    assert "Rayleigh scattering" in sent["messages"][0]["content"]
    assert "Paris" not in sent["messages"][0]["content"]
    assert sent["options"] == {"temperature": 0, "seed": 42, "num_predict": 200}


# -- construction and conversion (no server) -------------------------------------------------


def test_constructor_fields_reach_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_API_KEY", "from-env")
    model = ChatTokenwire(model="m", target="10.0.0.1:1,10.0.0.2:1", timeout=5.0,
                          grpc_metadata={"x-team": "rag"})
    client = model._sync_client()
    assert client.target == "ipv4:10.0.0.1:1,10.0.0.2:1" and client.timeout == 5.0
    assert ("authorization", "Bearer from-env") in client.metadata
    assert ("x-team", "rag") in client.metadata
    assert "from-env" not in repr(model) and "from-env" not in json.dumps(model.model_dump(
        mode="json"))
    model.close()
    assert model._llm_type == "tokenwire-chat"
    assert model._identifying_params == {"model": "m", "target": "10.0.0.1:1,10.0.0.2:1"}


def test_a_copy_has_channels_of_its_own() -> None:
    model = ChatTokenwire(model="m", target="127.0.0.1:1", temperature=0.5)
    first = model._sync_client()
    copied = model.model_copy(update={"target": "127.0.0.1:2"})
    deep = model.model_copy(deep=True)
    assert copied._sync_client().target == "127.0.0.1:2" and first.target == "127.0.0.1:1"
    assert deep._sync_client() is not first and deep.temperature == 0.5
    assert model._sync_client() is first
    for each in (model, copied, deep):
        each.close()


def test_a_deep_copy_shares_the_credentials() -> None:
    credentials = grpc.ssl_channel_credentials()  # a gRPC object: it cannot be copied
    model = ChatTokenwire(model="m", target="127.0.0.1:1", credentials=credentials)
    deep = model.model_copy(deep=True)
    assert deep.credentials is credentials and deep is not model


def test_async_clients_of_ended_loops_are_let_go() -> None:
    """Each asyncio.run is a new loop with a channel of its own; the ones of loops that
    ended go when the next loop asks (they held their loop: a weak map never freed them)."""
    model = ChatTokenwire(model="m", target="127.0.0.1:1")

    async def ask() -> object:
        return model._async_client()

    clients = [asyncio.run(ask()) for _ in range(3)]
    assert len({id(c) for c in clients}) == 3
    assert len(model._aclients) == 1


def test_a_finish_reason_newer_than_the_client_reads_other() -> None:
    last = chunk_message(pb.Token(done=True, finish_reason=99, model="m"), None)  # type: ignore[arg-type]
    assert last.response_metadata["finish_reason"] == "other"
    stop = chunk_message(pb.Token(done=True, finish_reason=pb.FINISH_REASON_STOP), None)
    assert stop.response_metadata["finish_reason"] == "stop"


def test_max_retries_sets_the_channels_retry_policy() -> None:
    assert "retryPolicy" not in json.dumps(_service_config(0))
    assert _service_config(4)["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    with pytest.raises(ValueError):
        _service_config(-1)


def test_messages_convert_with_images_and_roles() -> None:
    png = b"\x89PNG fake"
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    converted = to_messages([
        ChatMessage(role="user", content="hi"),
        HumanMessage(content=[{"type": "text", "text": "look: "},
                              {"type": "image_url", "image_url": {"url": data_url}},
                              {"type": "image", "base64": base64.b64encode(png).decode(),
                               "mime_type": "image/png"}]),
        AIMessage(content=[{"type": "reasoning", "reasoning": "hm"},
                           {"type": "text", "text": "ok"}]),
    ])
    assert [m.role for m in converted] == [pb.ROLE_USER, pb.ROLE_USER, pb.ROLE_ASSISTANT]
    assert converted[1].content == "look: " and list(converted[1].images) == [png, png]
    assert converted[2].content == "ok"
    with pytest.raises(ValueError, match="fetch an http"):
        to_messages([HumanMessage(content=[{"type": "image_url",
                                            "image_url": {"url": "https://x/y.png"}}])])
    with pytest.raises(ValueError, match="'file' content block"):
        to_messages([HumanMessage(content=[{"type": "file", "base64": "AA=="}])])
    with pytest.raises(ValueError, match="no tokenwire role"):
        to_messages([ChatMessage(role="narrator", content="once")])
