"""Every failure ends the call with the mapped status; tokens already sent stay
delivered; the server keeps serving."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama, Fault
from tests.helpers import detail, joined, reason, violations
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

GEN = pb.GenerateRequest(model="tiny", prompt="p")


async def _stream(stub: GenerationServiceStub,
                  request: pb.GenerateRequest = GEN) -> tuple[list[pb.Token], grpc.aio.AioRpcError]:
    tokens: list[pb.Token] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for token in stub.Generate(request):
            tokens.append(token)
    return tokens, info.value


async def _still_serving(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.set_fault(None)
    tokens = [t async for t in stub.Generate(GEN)]
    assert tokens[-1].done


async def test_unknown_model_is_not_found_and_says_to_pull(stub: GenerationServiceStub,
                                                           fake: FakeOllama) -> None:
    _, err = await _stream(stub, pb.GenerateRequest(model="nope", prompt="p"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in err.details() and "ollama pull nope" in err.details()
    info = detail(err, error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("model", "nope")
    assert reason(err) == "MODEL_NOT_FOUND"
    await _still_serving(stub, fake)


async def test_invalid_arguments_have_field_violations(stub: GenerationServiceStub,
                                                       fake: FakeOllama) -> None:
    request = pb.GenerateRequest(model="", prompt="p", options=pb.Options(top_p=2))
    _, err = await _stream(stub, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(err)] == ["model", "options.top_p"]
    assert "options.top_p: must be at most 1" in err.details()
    assert [r for r in fake.requests if r.method == "POST"] == []  # refused before Ollama


async def test_option_error_ollama_reports_as_500_is_invalid_argument(
    stub: GenerationServiceStub, fake: FakeOllama
) -> None:
    fake.set_fault(Fault(status=500, message='option "temperature" must be of type float32'))
    _, err = await _stream(stub)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err)[0][0] == "options.temperature"
    await _still_serving(stub, fake)


async def test_think_on_model_without_thinking_is_invalid_argument(
    stub: GenerationServiceStub,
) -> None:
    _, err = await _stream(stub, pb.GenerateRequest(model="tiny", prompt="p",
                                                    think=pb.THINK_ENABLED))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err)[0][0] == "think"


@pytest.mark.parametrize(("status", "code", "why"), [
    (503, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BUSY"),
    (500, grpc.StatusCode.INTERNAL, "UPSTREAM_ERROR"),
    (403, grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_FORBIDDEN"),
    (400, grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST"),
])
async def test_http_statuses(stub: GenerationServiceStub, fake: FakeOllama, status: int,
                             code: grpc.StatusCode, why: str) -> None:
    fake.set_fault(Fault(status=status, message="injected"))
    _, err = await _stream(stub)
    assert err.code() == code and reason(err) == why
    await _still_serving(stub, fake)


async def test_busy_carries_retry_info(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    fake.set_fault(Fault(status=503, message="server busy, please try again."))
    _, err = await _stream(stub)
    assert detail(err, error_details_pb2.RetryInfo).retry_delay.seconds >= 1


@pytest.mark.parametrize(("fault", "code", "why"), [
    (Fault(error_after=3, message="error reading llm response: boom"),
     grpc.StatusCode.INTERNAL, "UPSTREAM_STREAM_ERROR"),
    (Fault(error_after=3, message="an error was encountered while running the model: x"),
     grpc.StatusCode.UNAVAILABLE, "UPSTREAM_RUNNER_FAILED"),
    (Fault(drop_after=3), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_DISCONNECTED"),
    (Fault(truncate_after=3), grpc.StatusCode.INTERNAL, "UPSTREAM_TRUNCATED"),
    (Fault(raw_body=b'{"response":"a","done":false}\nnot json\n'),
     grpc.StatusCode.INTERNAL, "UPSTREAM_PROTOCOL_ERROR"),
])
async def test_mid_stream_failures_keep_delivered_tokens(
    stub: GenerationServiceStub, fake: FakeOllama, fault: Fault, code: grpc.StatusCode, why: str
) -> None:
    fake.set_fault(fault)
    tokens, err = await _stream(stub)
    assert err.code() == code and reason(err) == why
    expected = "a" if fault.raw_body else "".join(fake.tokens[:3])
    assert joined(tokens) == expected  # nothing already delivered is lost
    assert not any(t.done for t in tokens)  # never a silent short success
    await _still_serving(stub, fake)


async def test_upstream_down_is_unavailable_naming_the_url(stub: GenerationServiceStub,
                                                           fake: FakeOllama) -> None:
    await fake.go_down()
    _, err = await _stream(stub)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert fake.url in err.details()
    assert reason(err) == "UPSTREAM_UNREACHABLE"
    await fake.come_up()
    await _still_serving(stub, fake)


async def test_first_token_timeout(make_runtime: MakeRuntime, fake: FakeOllama) -> None:
    runtime = await make_runtime(first_token_timeout=0.3)
    fake.set_fault(Fault(hang=True))
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        _, err = await _stream(GenerationServiceStub(channel))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason(err) == "FIRST_TOKEN_TIMEOUT" and "--first-token-timeout" in err.details()
    await fake.wait_for_disconnect()  # and the upstream request was closed


async def test_idle_timeout_after_some_tokens(make_runtime: MakeRuntime,
                                              fake: FakeOllama) -> None:
    runtime = await make_runtime(idle_timeout=0.3, first_token_timeout=30)
    fake.set_fault(Fault(hang_after=2))
    started = asyncio.get_running_loop().time()
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        tokens, err = await _stream(GenerationServiceStub(channel))
    # the idle limit, not the (much longer) first-token wait, ended it
    assert asyncio.get_running_loop().time() - started < 5
    assert joined(tokens) == "".join(fake.tokens[:2])
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and reason(err) == "IDLE_TIMEOUT"
    await fake.wait_for_disconnect()


async def test_slow_first_token_within_limit_is_fine(make_runtime: MakeRuntime,
                                                     fake: FakeOllama) -> None:
    """A model that loads for longer than the idle limit must not trip it."""
    runtime = await make_runtime(first_token_timeout=3.0, idle_timeout=0.2)
    fake.set_fault(Fault(delay_first=0.6))
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        tokens = [t async for t in GenerationServiceStub(channel).Generate(GEN)]
    assert tokens[-1].done
    assert tokens[-1].usage.time_to_first_token.ToMilliseconds() >= 500


async def test_complete_without_request_is_invalid(stub: GenerationServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Complete(pb.CompleteRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(info.value)[0][0] == "request"


async def test_complete_mid_stream_error_is_an_error(stub: GenerationServiceStub,
                                                     fake: FakeOllama) -> None:
    fake.set_fault(Fault(error_after=2, message="boom"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Complete(pb.CompleteRequest(generate=GEN))
    assert info.value.code() == grpc.StatusCode.INTERNAL


async def test_oversize_message_refused_and_server_keeps_serving(
    make_runtime: MakeRuntime, fake: FakeOllama
) -> None:
    runtime = await make_runtime(max_message_bytes=64 * 1024, max_prompt_bytes=16 * 1024)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        stub = GenerationServiceStub(channel)
        _, err = await _stream(stub, pb.GenerateRequest(model="tiny", prompt="x" * 100_000))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _, err = await _stream(stub, pb.GenerateRequest(model="tiny", prompt="x" * 20_000))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err) == [("prompt", "20000 bytes, over the limit of 16384 bytes")]
        await _still_serving(stub, fake)


async def test_embed_and_models_errors(stub: GenerationServiceStub, fake: FakeOllama) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest(model="nope", inputs=["a"]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest(model="embedder"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await fake.go_down()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListModels(pb.ListModelsRequest())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await fake.come_up()


@pytest.mark.parametrize("request_", [
    pb.GenerateRequest(model="", prompt="p"),  # refused before Ollama is asked
    pb.GenerateRequest(model="missing", prompt="p"),  # refused by Ollama
], ids=["validation", "upstream"])
async def test_errors_carry_the_request_id_in_trailing_metadata(
        stub: GenerationServiceStub, request_: pb.GenerateRequest) -> None:
    # In the trailers because grpc.aio may hand a failed call empty initial metadata
    # when its status is processed first (the cause of a one-in-hundreds CI failure).
    call = stub.Generate(request_, metadata=(("x-request-id", "err-7"),))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        _ = [t async for t in call]
    assert failed.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert ("x-request-id", "err-7") in tuple(failed.value.trailing_metadata())
