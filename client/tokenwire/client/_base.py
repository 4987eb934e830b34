"""What ``Client`` and ``AsyncClient`` share: configuration, request preparation, and the
bookkeeping of a token stream. The twins only add the I/O (a blocking or an awaiting call).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Unpack

import grpc
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc

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

__all__ = ["DEFAULT_CHANNEL_OPTIONS", "DEFAULT_TARGET", "TARGET_ENV"]

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
OnToken = Callable[[generation_pb2.Token], object]


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
        target: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        metadata: MetadataLike = (),
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
        if credentials is None and (tls or root_certificates is not None):
            credentials = grpc.ssl_channel_credentials(root_certificates)
        #: ``None`` means a plaintext (insecure) channel.
        self.credentials = credentials
        self.metadata = _metadata(metadata)
        self.timeout = timeout
        overridden = {key for key, _ in options}
        self.options = [o for o in DEFAULT_CHANNEL_OPTIONS if o[0] not in overridden]
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
    def _open_stream(self, method: Any, kwargs: dict[str, Any]) -> _StreamT: ...

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
        return self._open_stream(self._stub.Generate, self._kwargs(request, timeout, metadata))

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
        return self._open_stream(self._stub.Chat, self._kwargs(request, timeout, metadata))

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


class _BaseTokenStream:
    """State of one streaming call, fed by the twins' read loops.

    ``text``, ``thinking`` and ``tool_calls`` accumulate as tokens arrive and survive a
    failure; ``final`` is the ``done`` Token once the stream has ended successfully.
    """

    def __init__(self, call: Any, metadata: Sequence[tuple[str, str]]) -> None:
        self._call = call
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
        """The whole answer; only once the stream has ended successfully."""
        final = self.final
        if final is None:
            raise RuntimeError("the stream has not finished")
        return Completion(
            text=self.text,
            thinking=self.thinking,
            tool_calls=tuple(self._tool_calls),
            finish_reason=final.finish_reason,
            usage=final.usage if final.HasField("usage") else None,
            model=final.model,
            request_id=self.request_id,
        )

    def cancel(self) -> bool:
        """Cancel the call; reading on raises ``Cancelled``. False if it had already ended."""
        self._cancel_requested = True
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

    def _accept(self, token: generation_pb2.Token | None) -> generation_pb2.Token | None:
        """Record ``token``; ``None`` (end of stream) is returned only after a final Token."""
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
