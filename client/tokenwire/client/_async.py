"""``AsyncClient``: the asyncio twin, on a ``grpc.aio`` channel."""

# ASYNC109 asks for asyncio.timeout instead of a `timeout` parameter; here `timeout` is the
# gRPC deadline, sent to the server so that it stops the work too. A local cancel scope
# could not do that, so the parameter stays, as in the sync twin.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc

from tokenwire.client._base import OnToken, Resumer, _BaseClient, _BaseTokenStream, _Unary
from tokenwire.client._requests import build_chat_request, build_generate_request
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
from tokenwire.v1 import generation_pb2

__all__ = ["AsyncClient", "AsyncTokenStream"]

_T = TypeVar("_T")


class AsyncTokenStream(_BaseTokenStream):
    """A running Generate or Chat call: an async iterator of ``Token`` and an async context
    manager. The call is closed (cancelled if still running) when the iteration ends, when
    an ``async for`` loop over it is left early, and when the ``async with`` block exits;
    use ``async with`` for a deterministic close.

    gRPC failures are raised as ``TokenwireError`` subclasses carrying ``partial_text``.
    """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the call if it is still running."""
        self._close()

    def __aiter__(self) -> AsyncIterator[generation_pb2.Token]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[generation_pb2.Token]:
        try:
            while (token := await self._read()) is not None:
                yield token
        finally:
            self._close()

    async def __anext__(self) -> generation_pb2.Token:
        token = await self._read()
        if token is None:
            raise StopAsyncIteration
        return token

    async def collect(self, on_token: OnToken | None = None) -> Completion:
        """Read to the end (calling ``on_token`` per Token) and return the whole answer."""
        async with self:
            while (token := await self._read()) is not None:
                self._notify(on_token, token)
        return self.completion

    async def _read(self) -> generation_pb2.Token | None:
        if self._finished:
            return None
        while True:
            try:
                if not self._have_metadata:
                    self._on_metadata(await self._call.initial_metadata())
                token = _token(await self._call.read())
                if self._is_id(token):
                    continue
                if token is not None and token.done:
                    await self._call.read()  # the status: the call is over once `final` is set
                    if self.request_id is None:
                        self._on_trailers(await self._call.trailing_metadata())
                break
            except grpc.RpcError as err:
                delay = self._resume_delay(err)
                if delay is None:
                    raise self._failure(err) from None
                await asyncio.sleep(delay)
                self._call = self._resumed_call()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._cancel_requested or (task is not None and task.cancelling()):
                    self._close()
                    raise
                raise self._cancelled() from None
        return self._accept(token)


class AsyncClient(_BaseClient[AsyncTokenStream]):
    """Asynchronous tokenwire client; ``async with AsyncClient() as client: ...``.

    Arguments as for ``Client``. Every method takes ``timeout=`` (seconds; ``None``: no
    deadline; default: the client's) and ``metadata=`` (added to the client's).
    """

    def _make_channel(self) -> Any:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self.options)
        return grpc.aio.secure_channel(self.target, self.credentials, options=self.options)

    def _open_stream(self, method: Any, kwargs: dict[str, Any],
                     resumer: Resumer | None = None) -> AsyncTokenStream:
        return AsyncTokenStream(method(**kwargs), kwargs["metadata"], resumer)

    async def start(
        self,
        model: str,
        prompt: str,
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[GenerateParams],
    ) -> str:
        """Start a resumable Generate without reading it; returns its stream id (read it
        with ``resume``, stop it with ``cancel``)."""
        request = build_generate_request(model, prompt, **params)
        return await self._run(self._prepare_start(request, timeout, metadata))

    async def start_chat(
        self,
        model: str,
        messages: Sequence[MessageLike],
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[ChatParams],
    ) -> str:
        """Start a resumable Chat without reading it; returns its stream id."""
        request = build_chat_request(model, messages, **params)
        return await self._run(self._prepare_start(request, timeout, metadata))

    async def cancel(
        self,
        stream_id: str,
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> bool:
        """Stop a resumable stream; True if it was still generating."""
        return await self._run(self._prepare_cancel(stream_id, timeout, metadata))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self._channel.close()

    async def generate_text(
        self,
        model: str,
        prompt: str,
        *,
        on_token: OnToken | None = None,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[GenerateParams],
    ) -> Completion:
        """Stream a Generate call to the end; ``on_token`` sees each Token as it arrives."""
        stream = self.generate(model, prompt, timeout=timeout, metadata=metadata, **params)
        return await stream.collect(on_token)

    async def chat_text(
        self,
        model: str,
        messages: Sequence[MessageLike],
        *,
        on_token: OnToken | None = None,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[ChatParams],
    ) -> Completion:
        """Stream a Chat call to the end; ``on_token`` sees each Token as it arrives."""
        stream = self.chat(model, messages, timeout=timeout, metadata=metadata, **params)
        return await stream.collect(on_token)

    async def complete(
        self,
        model: str,
        prompt: str,
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[GenerateParams],
    ) -> Completion:
        """Generate through the unary Complete RPC (no streaming)."""
        return await self._run(
            self._prepare_complete_generate(model, prompt, timeout, metadata, params)
        )

    async def complete_chat(
        self,
        model: str,
        messages: Sequence[MessageLike],
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[ChatParams],
    ) -> Completion:
        """Chat through the unary Complete RPC (no streaming)."""
        return await self._run(
            self._prepare_complete_chat(model, messages, timeout, metadata, params)
        )

    async def list_models(
        self, *, timeout: TimeoutLike = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> list[generation_pb2.Model]:
        """The models installed in the engine, most recently modified first."""
        return await self._run(self._prepare_list_models(timeout, metadata))

    async def embed(
        self,
        model: str,
        inputs: str | Sequence[str],
        *,
        truncate: bool | None = None,
        dimensions: int | None = None,
        keep_alive: KeepAliveLike | None = None,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> list[list[float]]:
        """One embedding vector per input, in order."""
        return await self._run(
            self._prepare_embed(model, inputs, truncate, dimensions, keep_alive, timeout, metadata)
        )

    async def health(
        self,
        service: str = "",
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> str:
        """The grpc.health.v1 status of ``service`` ("" = the server): "SERVING", ..."""
        return await self._run(self._prepare_health(service, timeout, metadata))

    async def _run(self, call: _Unary[_T]) -> _T:
        try:
            pending = call.method(**call.kwargs)
            response = await pending
            initial = await pending.initial_metadata()
            trailing = await pending.trailing_metadata()
        except grpc.RpcError as err:
            raise call.fail(err) from None
        return call.finish(response, initial, trailing)


def _token(message: Any) -> generation_pb2.Token | None:
    return None if message is grpc.aio.EOF else message
