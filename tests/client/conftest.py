"""A scripted stand-in GenerationService for the client tests.

One script (``plan``) decides what a call does, chosen by the request's model name; two
thin drivers play it on a grpc.aio server (for ``AsyncClient``) and on a sync
``grpc.server`` (for ``Client`` and the CLI: a blocking client must not share the event
loop of the server it calls).

    model       behaviour
    tiny        "echo: " + the prompt (chat: last message + " [number of messages]"), done
    thinker     thinking text, a tool call, then done
    missing     NOT_FOUND with ErrorInfo and ResourceInfo
    bad         INVALID_ARGUMENT with a BadRequest (also: an empty prompt)
    flaky       two tokens, then UNAVAILABLE with RetryInfo
    forever     a token every 10 ms until cancelled
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tokenwire.client import AsyncClient, Client
from tokenwire.v1 import generation_pb2, generation_pb2_grpc

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
Token = generation_pb2.Token
MODELS = [
    generation_pb2.Model(
        name="tiny:latest",
        size_bytes=91_000_000,
        family="llama",
        parameter_size="134.52M",
        quantization_level="Q4_1",
        upstreams=["gpu1", "gpu2"],
    ),
    generation_pb2.Model(name="thinker:1b", size_bytes=1_300_000_000, family="qwen3",
                         upstreams=["hosted"]),
]


@dataclass(frozen=True)
class Abort:
    status: grpc.Status


@dataclass(frozen=True)
class Pause:
    seconds: float


Step = Token | Abort | Pause


def rich_status(code: int, message: str, *details: Any) -> grpc.Status:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="tokenwire.dev", metadata=metadata)


def final_token(model: str, **fields: Any) -> Token:
    usage = generation_pb2.Usage(
        prompt_tokens=3,
        completion_tokens=2,
        time_to_first_token=duration_pb2.Duration(nanos=12_000_000),
        eval_tokens_per_second=42.5,
        upstream="gpu2",
        attempts=2,
    )
    return Token(
        done=True,
        finish_reason=generation_pb2.FINISH_REASON_STOP,
        usage=usage,
        model=model,
        **fields,
    )


def plan(model: str, text: str) -> Iterator[Step]:
    """What a Generate or Chat call on ``model`` does with input ``text``."""
    if model == "missing":
        yield Abort(
            rich_status(
                code_pb2.NOT_FOUND,
                f"model '{model}' not found",
                error_info("MODEL_NOT_FOUND", model=model),
                error_details_pb2.ResourceInfo(resource_type="model", resource_name=model),
            )
        )
    elif model == "bad" or not text:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field="prompt", description="must not be empty"
        )
        bad_request = error_details_pb2.BadRequest(field_violations=[violation])
        yield Abort(rich_status(code_pb2.INVALID_ARGUMENT, "invalid request", bad_request))
    elif model == "forever":
        while True:
            yield Token(text="tick ", chunk_count=1)
            yield Pause(0.01)
    elif model == "flaky":
        yield Token(text="partial ", chunk_count=1)
        yield Token(text="answer", chunk_count=1)
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=500_000_000))
        yield Abort(rich_status(code_pb2.UNAVAILABLE, "engine went away", retry))
    elif model == "thinker":
        yield Token(thinking="Let me think. ", chunk_count=1)
        call = generation_pb2.ToolCall(id="c1", name="get_weather")
        call.arguments.update({"city": "Paris"})
        yield Token(text="Calling a tool.", tool_calls=[call], chunk_count=1)
        yield final_token(model)
    else:
        yield Token(text="echo: ", chunk_count=1)
        yield Token(text=text, chunk_count=1)
        yield final_token(model)


def steps_for(
    request: generation_pb2.GenerateRequest | generation_pb2.ChatRequest,
) -> Iterator[Step]:
    """The plan of a Generate or Chat request; chat input is "<last message> [<count>]"."""
    if isinstance(request, generation_pb2.GenerateRequest):
        return plan(request.model, request.prompt)
    last = request.messages[-1].content if request.messages else ""
    return plan(request.model, f"{last} [{len(request.messages)}]" if last else "")


def complete(request: generation_pb2.CompleteRequest) -> generation_pb2.CompleteResponse | Abort:
    """The unary Complete: the same plan, collected."""
    response = generation_pb2.CompleteResponse()
    for step in steps_for(getattr(request, request.WhichOneof("request"))):
        if isinstance(step, Abort):
            return step
        if isinstance(step, Token):
            response.text += step.text
            response.thinking += step.thinking
            response.tool_calls.extend(step.tool_calls)
            if step.done:
                response.finish_reason = step.finish_reason
                response.usage.CopyFrom(step.usage)
                response.model = step.model
    return response


def embed(request: generation_pb2.EmbedRequest) -> generation_pb2.EmbedResponse:
    vectors = [generation_pb2.Embedding(values=[len(text), 0.5]) for text in request.inputs]
    return generation_pb2.EmbedResponse(embeddings=vectors, model=request.model)


#: Sent by a test to get no initial metadata back, as a grpc.aio client sees a call
#: whose status it processed before the initial metadata (the server's id is then only
#: in the trailers).
SKIP_INITIAL = ("x-test-skip-initial", "1")


def reply_metadata(context: Any) -> tuple[tuple[str, str], ...]:
    sent = dict(context.invocation_metadata())
    return (("x-request-id", sent.get("x-request-id", "req-test-1")),)


def greet(context: Any) -> tuple[tuple[str, str], ...] | None:
    """Like tokenwire: the request id goes in the trailers, and (unless the test asked
    otherwise) in the initial metadata, which is then returned for sending."""
    context.set_trailing_metadata(reply_metadata(context))
    skip = SKIP_INITIAL in tuple(context.invocation_metadata())
    return None if skip else reply_metadata(context)


@dataclass(frozen=True)
class _Status(grpc.Status):  # type: ignore[misc]
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def with_request_id(status: grpc.Status, context: Any) -> grpc.Status:
    """``status`` with the request id added to its trailers, as tokenwire sends it."""
    trailing = tuple(status.trailing_metadata) + reply_metadata(context)
    return _Status(status.code, status.details, trailing)


@dataclass
class Recorder:
    """What the servicer saw; ``interrupted`` is set when a stream stops before its end."""

    interrupted: Any
    requests: list[Any] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)

    def record(self, request: Any, context: Any) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))


class AsyncServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.seen = Recorder(asyncio.Event())

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Token]:
        self.seen.record(request, context)
        if initial := greet(context):
            await context.send_initial_metadata(initial)
        finished = False
        try:
            for step in steps_for(request):
                if isinstance(step, Abort):
                    finished = True
                    await context.abort_with_status(with_request_id(step.status, context))
                elif isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                else:
                    yield step
            finished = True
        finally:
            if not finished:
                self.seen.interrupted.set()

    Chat = Generate

    async def Complete(self, request: Any, context: Any) -> Any:
        self.seen.record(request, context)
        if initial := greet(context):
            await context.send_initial_metadata(initial)
        result = complete(request)
        if isinstance(result, Abort):
            await context.abort_with_status(with_request_id(result.status, context))
        return result

    async def ListModels(self, request: Any, context: Any) -> Any:
        return generation_pb2.ListModelsResponse(models=MODELS)

    async def Embed(self, request: Any, context: Any) -> Any:
        return embed(request)


class SyncServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.seen = Recorder(threading.Event())

    def Generate(self, request: Any, context: Any) -> Iterator[Token]:
        self.seen.record(request, context)
        if initial := greet(context):
            context.send_initial_metadata(initial)
        finished = False
        try:
            for step in steps_for(request):
                if isinstance(step, Abort):
                    finished = True
                    context.abort_with_status(with_request_id(step.status, context))
                elif isinstance(step, Pause):
                    time.sleep(step.seconds)
                else:
                    yield step
            finished = True
        finally:
            if not finished:
                self.seen.interrupted.set()

    Chat = Generate

    def Complete(self, request: Any, context: Any) -> Any:
        self.seen.record(request, context)
        if initial := greet(context):
            context.send_initial_metadata(initial)
        result = complete(request)
        if isinstance(result, Abort):
            context.abort_with_status(with_request_id(result.status, context))
        return result

    def ListModels(self, request: Any, context: Any) -> Any:
        return generation_pb2.ListModelsResponse(models=MODELS)

    def Embed(self, request: Any, context: Any) -> Any:
        return embed(request)


HEALTH = {"": "SERVING", SERVICE_NAME: "SERVING", "down": "NOT_SERVING"}


@dataclass
class Served:
    target: str
    seen: Recorder


@pytest.fixture
async def aio_server() -> AsyncIterator[Served]:
    servicer = AsyncServicer()
    health_servicer = health.aio.HealthServicer()
    for name, status in HEALTH.items():
        await health_servicer.set(name, health_pb2.HealthCheckResponse.ServingStatus.Value(status))
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Served(f"127.0.0.1:{port}", servicer.seen)
    await server.stop(None)


@pytest.fixture
def sync_server() -> Iterator[Served]:
    servicer = SyncServicer()
    health_servicer = health.HealthServicer()
    for name, status in HEALTH.items():
        health_servicer.set(name, health_pb2.HealthCheckResponse.ServingStatus.Value(status))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Served(f"127.0.0.1:{port}", servicer.seen)
    server.stop(None).wait()


@pytest.fixture
async def aclient(aio_server: Served) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(aio_server.target) as client:
        yield client


@pytest.fixture
def client(sync_server: Served) -> Iterator[Client]:
    with Client(sync_server.target) as client:
        yield client
