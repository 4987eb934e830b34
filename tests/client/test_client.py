"""Both client twins against the scripted servers in conftest.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tokenwire.client import (
    AsyncClient,
    CallbackError,
    Cancelled,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from tokenwire.v1 import generation_pb2

from .conftest import MODELS, SERVICE_NAME, SKIP_INITIAL, Served

WAIT = 5.0


# --- AsyncClient: streaming ------------------------------------------------------------


async def test_generate_streams_tokens_in_order_then_final(aclient: AsyncClient) -> None:
    async with aclient.generate("tiny", "hi") as stream:
        texts = [token.text async for token in stream]
    assert texts == ["echo: ", "hi", ""]
    assert stream.text == "echo: hi"
    assert stream.final is not None and stream.final.done
    assert stream.final.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert stream.request_id == "req-test-1"
    completion = stream.completion
    assert completion.finish_reason_name == "STOP"
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    # which configured upstream served it, in how many attempts (Usage.upstream/attempts)
    assert (completion.upstream, completion.attempts) == ("gpu2", 2)


async def test_stream_can_be_stepped_with_anext(aclient: AsyncClient) -> None:
    stream = aclient.generate("tiny", "hi")
    assert (await anext(stream)).text == "echo: "
    assert (await anext(stream)).text == "hi"
    assert (await anext(stream)).done
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_request_id_survives_empty_initial_metadata(aclient: AsyncClient) -> None:
    # What a grpc.aio client sees when it handles a call's status before its initial
    # metadata: nothing there. The id must then come from the trailers.
    stream = aclient.generate("tiny", "hi", metadata=[SKIP_INITIAL])
    done = await stream.collect()
    assert (done.text, done.request_id) == ("echo: hi", "req-test-1")
    with pytest.raises(NotFound) as not_found:
        await aclient.generate_text("missing", "hi", metadata=[SKIP_INITIAL])
    assert not_found.value.request_id == "req-test-1"
    unary = await aclient.complete("tiny", "hi", metadata=[SKIP_INITIAL])
    assert unary.request_id == "req-test-1"


async def test_caller_request_id_and_metadata_reach_the_server(aio_server: Served) -> None:
    async with AsyncClient(aio_server.target, metadata={"authorization": "Bearer t"}) as c:
        done = await c.generate_text("tiny", "hi", metadata=[("x-request-id", "mine")])
    assert done.request_id == "mine"
    sent = aio_server.seen.metadata[-1]
    assert sent["authorization"] == "Bearer t"
    assert sent["x-request-id"] == "mine"


async def test_chat_sends_history_and_collects_thinking_and_tools(
    aclient: AsyncClient, aio_server: Served
) -> None:
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
    ]
    done = await aclient.chat_text(
        "thinker", history, tools=[{"name": "get_weather", "parameters": {"type": "object"}}]
    )
    assert done.text == "Calling a tool."
    assert done.thinking == "Let me think. "
    assert [call.name for call in done.tool_calls] == ["get_weather"]
    assert dict(done.tool_calls[0].arguments) == {"city": "Paris"}
    request = aio_server.seen.requests[-1]
    roles = [m.role for m in request.messages]
    assert roles == [generation_pb2.ROLE_SYSTEM, generation_pb2.ROLE_USER]
    assert request.tools[0].name == "get_weather"
    message = done.to_message()
    assert message.role == generation_pb2.ROLE_ASSISTANT and message.tool_calls[0].id == "c1"


async def test_chat_echoes_message_count(aclient: AsyncClient) -> None:
    done = await aclient.chat_text("tiny", [{"role": "user", "content": "hello"}])
    assert done.text == "echo: hello [1]"


async def test_leaving_the_stream_early_cancels_the_call(
    aclient: AsyncClient, aio_server: Served
) -> None:
    async with aclient.generate("forever", "go") as stream:
        async for token in stream:
            assert token.text == "tick "
            break
    await asyncio.wait_for(aio_server.seen.interrupted.wait(), WAIT)
    assert stream.final is None


async def test_breaking_out_of_async_for_cancels_the_call(
    aclient: AsyncClient, aio_server: Served
) -> None:
    stream = aclient.generate("forever", "go")
    async for _ in stream:
        break
    await asyncio.wait_for(aio_server.seen.interrupted.wait(), WAIT)


async def test_cancel_raises_cancelled_with_partial_text(
    aclient: AsyncClient, aio_server: Served
) -> None:
    stream = aclient.generate("forever", "go")
    await anext(stream)
    assert stream.cancel()
    with pytest.raises(Cancelled) as caught:
        await anext(stream)
    assert caught.value.partial_text == "tick "
    await asyncio.wait_for(aio_server.seen.interrupted.wait(), WAIT)


async def test_not_found_is_mapped_with_details(aclient: AsyncClient) -> None:
    with pytest.raises(NotFound) as caught:
        await aclient.generate_text("missing", "hi")
    exc = caught.value
    assert str(exc) == "NOT_FOUND: model 'missing' not found"
    assert exc.error_info is not None and exc.error_info.reason == "MODEL_NOT_FOUND"
    assert exc.resource_info is not None and exc.resource_info.resource_name == "missing"
    assert exc.request_id == "req-test-1"


async def test_invalid_argument_carries_field_violations(aclient: AsyncClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        async with aclient.generate("tiny", "") as stream:
            async for _ in stream:
                pass
    assert caught.value.field_violations == [("prompt", "must not be empty")]


async def test_partial_text_survives_a_mid_stream_failure(aclient: AsyncClient) -> None:
    stream = aclient.generate("flaky", "hi")
    seen = []
    with pytest.raises(Unavailable) as caught:
        async for token in stream:
            seen.append(token.text)
    assert seen == ["partial ", "answer"]
    assert caught.value.partial_text == "partial answer" == stream.text
    assert caught.value.retry_after == 0.5
    assert caught.value.request_id == "req-test-1"


async def test_timeout_raises_deadline_exceeded(aclient: AsyncClient) -> None:
    with pytest.raises(DeadlineExceeded) as caught:
        await aclient.generate_text("forever", "go", timeout=0.3)
    assert caught.value.partial_text.startswith("tick ")


async def test_client_default_timeout_applies_and_can_be_lifted(aio_server: Served) -> None:
    async with AsyncClient(aio_server.target, timeout=0.2) as c:
        with pytest.raises(DeadlineExceeded):
            await c.generate_text("forever", "go")
        assert (await c.generate_text("tiny", "hi", timeout=None)).text == "echo: hi"


async def test_raising_callback_cancels_call_and_channel_stays_usable(
    aclient: AsyncClient, aio_server: Served
) -> None:
    def explode(token: generation_pb2.Token) -> None:
        raise ValueError("bad consumer")

    with pytest.raises(CallbackError) as caught:
        await aclient.generate_text("forever", "go", on_token=explode)
    assert isinstance(caught.value.__cause__, ValueError)
    assert caught.value.partial_text == "tick "
    await asyncio.wait_for(aio_server.seen.interrupted.wait(), WAIT)
    assert (await aclient.generate_text("tiny", "again")).text == "echo: again"


async def test_callback_sees_every_token(aclient: AsyncClient) -> None:
    tokens: list[generation_pb2.Token] = []
    done = await aclient.generate_text("tiny", "hi", on_token=tokens.append)
    assert [t.text for t in tokens] == ["echo: ", "hi", ""]
    assert done.text == "echo: hi"


# --- AsyncClient: unary ------------------------------------------------------------------


async def test_complete_uses_the_unary_rpc(aclient: AsyncClient, aio_server: Served) -> None:
    done = await aclient.complete("tiny", "hi", options={"temperature": 0.0})
    assert (done.text, done.model, done.request_id) == ("echo: hi", "tiny", "req-test-1")
    request = aio_server.seen.requests[-1]
    assert isinstance(request, generation_pb2.CompleteRequest)
    assert request.generate.options.HasField("temperature")
    chat = await aclient.complete_chat("tiny", [{"role": "user", "content": "yo"}])
    assert chat.text == "echo: yo [1]"


async def test_complete_errors_are_mapped(aclient: AsyncClient) -> None:
    with pytest.raises(NotFound) as caught:
        await aclient.complete("missing", "hi")
    assert caught.value.request_id == "req-test-1"
    assert caught.value.error_info is not None


async def test_list_models_embed_and_health(aclient: AsyncClient) -> None:
    assert await aclient.list_models() == MODELS
    assert await aclient.embed("emb", ["ab", "abc"]) == [[2.0, 0.5], [3.0, 0.5]]
    assert await aclient.health() == "SERVING"
    assert await aclient.health(SERVICE_NAME) == "SERVING"
    assert await aclient.health("down") == "NOT_SERVING"
    with pytest.raises(NotFound):
        await aclient.health("nope")


async def test_unreachable_server_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(Unavailable):
            await c.list_models()


# --- Client (sync) ---------------------------------------------------------------------


def test_sync_generate_streams_tokens(client: Client) -> None:
    with client.generate("tiny", "hi") as stream:
        texts = [token.text for token in stream]
    assert texts == ["echo: ", "hi", ""]
    assert stream.completion.text == "echo: hi"
    assert stream.request_id == "req-test-1"


def test_sync_break_cancels_the_call(client: Client, sync_server: Served) -> None:
    stream = client.generate("forever", "go")
    for token in stream:
        assert token.text == "tick "
        break
    assert sync_server.seen.interrupted.wait(WAIT)


def test_sync_errors_and_partial_text(client: Client) -> None:
    with pytest.raises(NotFound) as not_found:
        client.generate_text("missing", "hi")
    assert not_found.value.request_id == "req-test-1"
    with pytest.raises(InvalidArgument) as invalid:
        list(client.generate("bad", "hi"))
    assert invalid.value.field_violations == [("prompt", "must not be empty")]
    with pytest.raises(Unavailable) as unavailable:
        client.chat_text("flaky", [{"role": "user", "content": "hi"}])
    assert unavailable.value.partial_text == "partial answer"


def test_sync_timeout(client: Client) -> None:
    with pytest.raises(DeadlineExceeded):
        client.generate_text("forever", "go", timeout=0.3)


def test_sync_cancel(client: Client, sync_server: Served) -> None:
    stream = client.generate("forever", "go")
    next(stream)
    stream.cancel()
    with pytest.raises(Cancelled) as caught:
        next(stream)
    assert caught.value.partial_text == "tick "
    assert sync_server.seen.interrupted.wait(WAIT)


def test_sync_callback_error(client: Client, sync_server: Served) -> None:
    def explode(token: generation_pb2.Token) -> None:
        raise RuntimeError("stop")

    with pytest.raises(CallbackError) as caught:
        client.generate_text("forever", "go", on_token=explode)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert sync_server.seen.interrupted.wait(WAIT)
    assert client.generate_text("tiny", "again").text == "echo: again"


def test_sync_request_id_survives_empty_initial_metadata(client: Client) -> None:
    assert client.generate_text("tiny", "hi", metadata=[SKIP_INITIAL]).request_id == "req-test-1"
    assert client.complete("tiny", "hi", metadata=[SKIP_INITIAL]).request_id == "req-test-1"
    with pytest.raises(NotFound) as not_found:
        client.generate_text("missing", "hi", metadata=[SKIP_INITIAL])
    assert not_found.value.request_id == "req-test-1"


def test_sync_unary_calls(client: Client) -> None:
    assert client.complete("tiny", "hi").text == "echo: hi"
    with pytest.raises(NotFound) as caught:
        client.complete("missing", "hi", metadata={"x-request-id": "r9"})
    assert caught.value.request_id == "r9"
    assert client.list_models() == MODELS
    assert client.embed("emb", "abcd") == [[4.0, 0.5]]
    assert client.health() == "SERVING"
    assert client.health("down") == "NOT_SERVING"


# --- configuration -------------------------------------------------------------------


def test_target_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_TARGET", "example.test:7000")
    with Client() as c:
        assert c.target == "example.test:7000"
        assert c.credentials is None
    monkeypatch.delenv("TOKENWIRE_TARGET")
    with Client() as c:
        assert c.target == "127.0.0.1:50051"


def test_channel_options_have_defaults_and_overrides() -> None:
    with Client(options=[("grpc.max_receive_message_length", 1024)]) as c:
        options = dict(c.options)
    assert options["grpc.max_receive_message_length"] == 1024
    assert "grpc.keepalive_time_ms" in options


def test_tls_builds_credentials() -> None:
    with Client("example.test:443", tls=True) as c:
        assert isinstance(c.credentials, grpc.ChannelCredentials)
        assert "tls" in repr(c)
