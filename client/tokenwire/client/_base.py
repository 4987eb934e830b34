"""What ``Client`` and ``AsyncClient`` share: configuration, request preparation, and the
bookkeeping of a token stream. The twins only add the I/O (a blocking or an awaiting call).
"""

from __future__ import annotations

import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar, Unpack

import grpc
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire.client._channel import (
    DEFAULT_SERVICE_CONFIG,
    ServiceConfigLike,
    TargetLike,
    channel_target,
    service_config_option,
)
from tokenwire.client._errors import (
    CallbackError,
    TokenwireError,
    error_for,
    from_rpc_error,
    request_id_from,
)
from tokenwire.client._requests import (
    build_chat_request,
    build_embed_request,
    build_generate_request,
)
from tokenwire.client._types import (
    USE_DEFAULT,
    ChatParams,
    Completion,
    GenerateParams,
    KeepAliveLike,
    MessageLike,
    MetadataLike,
    TimeoutLike,
)
from tokenwire.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["DEFAULT_CHANNEL_OPTIONS", "DEFAULT_TARGET", "TARGET_ENV", "Resumer"]

DEFAULT_TARGET = "127.0.0.1:50051"
#: Environment variable read when no target is given.
TARGET_ENV = "TOKENWIRE_TARGET"
#: Channel options applied unless the caller overrides the same key.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Room for large embedding batches and long Complete answers.
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    # Detect dead connections during long silent waits (model loading) without tripping
    # the server's default ping policy (pings at most every 5 minutes when idle).
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.primary_user_agent", "tokenwire-python"),
)

_T = TypeVar("_T")
_StreamT = TypeVar("_StreamT")
#: Called with each Token as it arrives (see ``generate_text``).
OnToken: TypeAlias = Callable[[generation_pb2.Token], object]


@dataclass(frozen=True, slots=True)
class _Unary(Generic[_T]):
    """A prepared unary call: the twins run it, ``result`` turns the response into ``_T``."""

    method: Any
    kwargs: dict[str, Any]
    result: Callable[[Any, str | None], _T]

    def finish(self, response: Any, initial: Any, trailing: Any) -> _T:
        rid = request_id_from(initial) or request_id_from(trailing) or self._sent_request_id()
        return self.result(response, rid)

    def fail(self, err: grpc.RpcError) -> TokenwireError:
        exc = from_rpc_error(err)
        exc.request_id = exc.request_id or self._sent_request_id()
        return exc

    def _sent_request_id(self) -> str | None:
        return request_id_from(self.kwargs["metadata"])


class _BaseClient(ABC, Generic[_StreamT]):
    """Configuration shared by both twins; see ``Client`` for the arguments."""

    def __init__(
        self,
        target: TargetLike | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        metadata: MetadataLike = (),
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        service_config: ServiceConfigLike = DEFAULT_SERVICE_CONFIG,
    ) -> None:
        #: The gRPC target string (a list of addresses becomes an ipv4:/ipv6: URI).
        self.target = channel_target(target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET)
        if credentials is None and (tls or root_certificates is not None):
            credentials = grpc.ssl_channel_credentials(root_certificates)
        #: ``None`` means a plaintext (insecure) channel.
        self.credentials = credentials
        self.metadata = _metadata(metadata)
        self.timeout = timeout
        overridden = {key for key, _ in options}
        defaults = (*DEFAULT_CHANNEL_OPTIONS, *service_config_option(service_config))
        self.options = [o for o in defaults if o[0] not in overridden]
        self.options.extend(options)
        self._channel = self._make_channel()
        # The generated stub is untyped; both channel kinds build the same stub.
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health_stub = health_pb2_grpc.HealthStub(self._channel)

    def __repr__(self) -> str:
        secure = "tls" if self.credentials is not None else "insecure"
        return f"{type(self).__name__}({self.target!r}, {secure})"

    @abstractmethod
    def _make_channel(self) -> Any: ...

    @abstractmethod
    def _open_stream(self, method: Any, kwargs: dict[str, Any],
                     resumer: Resumer | None = None) -> _StreamT: ...

    def _stream(self, method: Any, request: generation_pb2.GenerateRequest
                | generation_pb2.ChatRequest, timeout: TimeoutLike,
                metadata: MetadataLike | None) -> _StreamT:
        kwargs = self._kwargs(request, timeout, metadata)
        resumer = None
        if request.HasField("resumable"):
            resumer = Resumer(self._stub.Resume, self._stub.Cancel, kwargs["metadata"],
                              kwargs["timeout"])
        return self._open_stream(method, kwargs, resumer)

    def resume(
        self,
        stream_id: str,
        after: int = 0,
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> _StreamT:
        """Continue a resumable stream from chunk ``after`` (``position + chunk_count`` of
        the last Token received; 0: from the start). It resumes again by itself if the
        connection drops, like a stream started with ``resumable=True``."""
        request = generation_pb2.ResumeRequest(stream_id=stream_id, after=after)
        kwargs = self._kwargs(request, timeout, metadata)
        resumer = Resumer(self._stub.Resume, self._stub.Cancel, kwargs["metadata"],
                          kwargs["timeout"])
        return self._open_stream(self._stub.Resume, kwargs, resumer.known(stream_id, after))

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[GenerateParams],
    ) -> _StreamT:
        """Start a Generate stream; iterate the result for ``Token`` messages."""
        request = build_generate_request(model, prompt, **params)
        return self._stream(self._stub.Generate, request, timeout, metadata)

    def chat(
        self,
        model: str,
        messages: Sequence[MessageLike],
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[ChatParams],
    ) -> _StreamT:
        """Start a Chat stream for the next assistant turn of ``messages``."""
        request = build_chat_request(model, messages, **params)
        return self._stream(self._stub.Chat, request, timeout, metadata)

    def _kwargs(
        self, request: ProtoMessage, timeout: TimeoutLike, metadata: MetadataLike | None
    ) -> dict[str, Any]:
        return {
            "request": request,
            "timeout": self.timeout if timeout is USE_DEFAULT else timeout,
            "metadata": self.metadata + _metadata(metadata or ()),
        }

    def _unary(
        self,
        method: Any,
        request: ProtoMessage,
        timeout: TimeoutLike,
        metadata: MetadataLike | None,
        result: Callable[[Any, str | None], _T],
    ) -> _Unary[_T]:
        return _Unary(method, self._kwargs(request, timeout, metadata), result)

    def _prepare_complete(
        self,
        request: generation_pb2.CompleteRequest,
        timeout: TimeoutLike,
        metadata: MetadataLike | None,
    ) -> _Unary[Completion]:
        return self._unary(
            self._stub.Complete, request, timeout, metadata, Completion.from_response
        )

    def _prepare_complete_generate(
        self,
        model: str,
        prompt: str,
        timeout: TimeoutLike,
        metadata: MetadataLike | None,
        params: GenerateParams,
    ) -> _Unary[Completion]:
        generate = build_generate_request(model, prompt, **params)
        request = generation_pb2.CompleteRequest(generate=generate)
        return self._prepare_complete(request, timeout, metadata)

    def _prepare_complete_chat(
        self,
        model: str,
        messages: Sequence[MessageLike],
        timeout: TimeoutLike,
        metadata: MetadataLike | None,
        params: ChatParams,
    ) -> _Unary[Completion]:
        request = generation_pb2.CompleteRequest(chat=build_chat_request(model, messages, **params))
        return self._prepare_complete(request, timeout, metadata)

    def _prepare_start(
        self,
        request: generation_pb2.GenerateRequest | generation_pb2.ChatRequest,
        timeout: TimeoutLike,
        metadata: MetadataLike | None,
    ) -> _Unary[str]:
        start = (generation_pb2.StartRequest(generate=request)
                 if isinstance(request, generation_pb2.GenerateRequest)
                 else generation_pb2.StartRequest(chat=request))
        return self._unary(self._stub.Start, start, timeout, metadata,
                           lambda r, _: str(r.stream_id))

    def _prepare_cancel(
        self, stream_id: str, timeout: TimeoutLike, metadata: MetadataLike | None
    ) -> _Unary[bool]:
        request = generation_pb2.CancelRequest(stream_id=stream_id)
        return self._unary(self._stub.Cancel, request, timeout, metadata,
                           lambda r, _: bool(r.stopped))

    def _prepare_list_models(
        self, timeout: TimeoutLike, metadata: MetadataLike | None
    ) -> _Unary[list[generation_pb2.Model]]:
        request = generation_pb2.ListModelsRequest()
        return self._unary(
            self._stub.ListModels, request, timeout, metadata, lambda r, _: list(r.models)
        )

    def _prepare_embed(
        self,
        model: str,
        inputs: str | Sequence[str],
        truncate: bool | None,
        dimensions: int | None,
        keep_alive: KeepAliveLike | None,
        timeout: TimeoutLike,
        metadata: MetadataLike | None,
    ) -> _Unary[list[list[float]]]:
        request = build_embed_request(
            model, inputs, truncate=truncate, dimensions=dimensions, keep_alive=keep_alive
        )
        return self._unary(self._stub.Embed, request, timeout, metadata, _vectors)

    def _prepare_health(
        self, service: str, timeout: TimeoutLike, metadata: MetadataLike | None
    ) -> _Unary[str]:
        request = health_pb2.HealthCheckRequest(service=service)
        return self._unary(self._health_stub.Check, request, timeout, metadata, _serving_status)


class Resumer:
    """How a resumable stream continues after a dropped connection: Resume with the
    position it got to, after a backoff (full jitter), at most ``attempts`` times in a
    row without a new Token, never past the original call's deadline."""

    #: Resume attempts in a row without progress, and the first and the longest wait.
    attempts = 8
    backoff = 0.1
    max_backoff = 3.0

    def __init__(self, resume: Any, cancel: Any, metadata: tuple[tuple[str, str], ...],
                 timeout: float | None) -> None:
        self._resume = resume
        self._cancel = cancel
        self.metadata = metadata
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.failures = 0
        self.stream_id: str | None = None
        self.after = 0

    def known(self, stream_id: str, after: int) -> Resumer:
        """For a stream read with Resume: its id and first position are known at once."""
        self.stream_id, self.after = stream_id, after
        return self

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt; None when no attempt is left."""
        if self.failures >= self.attempts:
            return None
        self.failures += 1
        delay = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (self.failures - 1)))
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay

    def open(self, stream_id: str, after: int) -> Any:
        timeout = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)
        request = generation_pb2.ResumeRequest(stream_id=stream_id, after=after)
        return self._resume(request, timeout=timeout, metadata=self.metadata)

    def send_cancel(self, stream_id: str) -> Any:
        """Starts a Cancel call without waiting for it; returns the call (a sync stub's
        future, or a grpc.aio call, which runs as soon as it is made)."""
        request = generation_pb2.CancelRequest(stream_id=stream_id)
        start = getattr(self._cancel, "future", None) or self._cancel
        return start(request, timeout=10.0, metadata=self.metadata)


#: Why a resumable stream may be resumed: the connection failed (no status from
#: tokenwire: a dropped connection, a replica that went away), or the replica reading it
#: lost Redis for a moment. A status of the stream itself (even UNAVAILABLE) is final: a
#: Resume would only say it again.
_RESUMABLE_REASONS = frozenset({"RESUME_STORE_UNAVAILABLE"})
#: UNKNOWN without a tokenwire reason: the HTTP/2 stream ended with no gRPC status at all
#: ("Stream removed"), which is how HAProxy ends a client's stream when the replica behind
#: it dies mid-answer; a Resume then says what really happened.
_RESUME_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN})


class _BaseTokenStream:
    """State of one streaming call, fed by the twins' read loops.

    ``text``, ``thinking`` and ``tool_calls`` accumulate as tokens arrive and survive a
    failure; ``final`` is the ``done`` Token once the stream has ended successfully.
    """

    def __init__(self, call: Any, metadata: Sequence[tuple[str, str]],
                 resumer: Resumer | None = None) -> None:
        self._call = call
        self._resumer = resumer
        #: A resumable stream's id (from its first message), else None.
        self.stream_id: str | None = resumer.stream_id if resumer is not None else None
        #: Resumable streams: how many engine chunks have arrived (pass it to ``resume``).
        self.position = resumer.after if resumer is not None else 0
        #: How many times the stream was resumed after a dropped connection.
        self.resumes = 0
        self._cancel_call: Any = None
        self._text: list[str] = []
        self._thinking: list[str] = []
        self._tool_calls: list[generation_pb2.ToolCall] = []
        #: The last Token (``done = true``), once the stream has ended successfully.
        self.final: generation_pb2.Token | None = None
        #: The server's ``x-request-id`` (the caller's own if it sent one).
        self.request_id: str | None = request_id_from(metadata)
        self._have_metadata = False
        self._finished = False
        self._cancel_requested = False

    @property
    def text(self) -> str:
        """Answer text received so far."""
        return "".join(self._text)

    @property
    def thinking(self) -> str:
        """Thinking text received so far."""
        return "".join(self._thinking)

    @property
    def tool_calls(self) -> list[generation_pb2.ToolCall]:
        """Tool calls received so far."""
        return list(self._tool_calls)

    @property
    def completion(self) -> Completion:
        """The whole answer, once the stream has ended successfully (``RuntimeError``
        before). Unlike ``final`` it is never None, so it needs no check under mypy."""
        final = self.final
        if final is None:
            raise RuntimeError("the stream has not finished")
        return Completion.from_final(
            final,
            text=self.text,
            thinking=self.thinking,
            tool_calls=tuple(self._tool_calls),
            request_id=self.request_id,
        )

    def cancel(self) -> bool:
        """Cancel the call; reading on raises ``Cancelled``. False if it had already ended.
        A resumable stream is also stopped on the server (a Cancel call is sent without
        waiting for its answer), not just left to its detach grace."""
        self._cancel_requested = True
        if self._resumer is not None and self.stream_id is not None and not self._finished:
            self._cancel_call = self._resumer.send_cancel(self.stream_id)
        return bool(self._call.cancel())

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            self._call.cancel()

    def _on_metadata(self, metadata: Any) -> None:
        self._have_metadata = True
        self.request_id = request_id_from(metadata) or self.request_id

    def _on_trailers(self, metadata: Any) -> None:
        # grpc.aio hands a call empty initial metadata when its status is processed
        # first; the server repeats the request id in the trailers.
        self.request_id = self.request_id or request_id_from(metadata)

    def _is_id(self, token: generation_pb2.Token | None) -> bool:
        """True for a resumable stream's first message, which carries only its id (it is
        recorded, not handed to the caller)."""
        if token is None or not token.stream_id:
            return False
        self.stream_id = token.stream_id
        return True

    def _resume_delay(self, err: grpc.RpcError) -> float | None:
        """Seconds to wait before resuming after ``err``; None: do not resume."""
        resumer = self._resumer
        if (resumer is None or self.stream_id is None or self._cancel_requested
                or err.code() not in _RESUME_CODES):
            return None
        info = from_rpc_error(err).error_info
        if info is not None and info.reason not in _RESUMABLE_REASONS:
            return None  # the stream itself failed: a Resume would say the same
        return resumer.next_delay()

    def _resumed_call(self) -> Any:
        assert self._resumer is not None and self.stream_id is not None
        self.resumes += 1
        return self._resumer.open(self.stream_id, self.position)

    def _accept(self, token: generation_pb2.Token | None) -> generation_pb2.Token | None:
        """Record ``token``; ``None`` (end of stream) is returned only after a final Token."""
        if token is not None and self.stream_id is not None:
            if token.chunk_count:
                self.position = token.position + token.chunk_count
            if self._resumer is not None:
                self._resumer.failures = 0  # progress: a fresh set of attempts
        if token is None:
            self._finished = True
            if self.final is None:
                raise self._error(grpc.StatusCode.DATA_LOSS, "stream ended without a final token")
            return None
        self._text.append(token.text)
        self._thinking.append(token.thinking)
        self._tool_calls.extend(token.tool_calls)
        if token.done:
            self.final = token
        return token

    def _error(self, code: grpc.StatusCode, message: str) -> TokenwireError:
        self._finished = True
        return error_for(code, message, request_id=self.request_id, partial_text=self.text)

    def _failure(self, err: grpc.RpcError) -> TokenwireError:
        self._finished = True
        exc = from_rpc_error(err)
        exc.partial_text = self.text
        exc.request_id = exc.request_id or self.request_id
        return exc

    def _cancelled(self) -> TokenwireError:
        return self._error(grpc.StatusCode.CANCELLED, "cancelled by the caller")

    def _notify(self, on_token: OnToken | None, token: generation_pb2.Token) -> None:
        if on_token is None:
            return
        try:
            on_token(token)
        except Exception as exc:
            self._close()
            raise CallbackError(
                f"on_token callback raised {type(exc).__name__}: {exc}",
                partial_text=self.text,
                request_id=self.request_id,
            ) from exc


def _metadata(metadata: MetadataLike) -> tuple[tuple[str, str], ...]:
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    # gRPC metadata keys are lower case (HTTP/2 header names); accept any case from callers.
    return tuple((str(key).lower(), str(value)) for key, value in items)


def _vectors(response: generation_pb2.EmbedResponse, _: str | None) -> list[list[float]]:
    return [list(embedding.values) for embedding in response.embeddings]


def _serving_status(response: Any, _: str | None) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
