"""``Client``: the blocking twin, on a sync gRPC channel."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
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

__all__ = ["Client", "TokenStream"]

_T = TypeVar("_T")


class TokenStream(_BaseTokenStream):
    """A running Generate or Chat call: an iterator of ``Token`` and a context manager.

    The call is closed (cancelled if still running) when the iteration ends, when a ``for``
    loop over it is left early (``break``, an exception, Ctrl-C), and when the ``with``
    block exits. gRPC failures are raised as ``TokenwireError`` subclasses carrying
    ``partial_text``.
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the call if it is still running."""
        self._close()

    def __iter__(self) -> Iterator[generation_pb2.Token]:
        try:
            while (token := self._read()) is not None:
                yield token
        finally:
            self._close()

    def __next__(self) -> generation_pb2.Token:
        token = self._read()
        if token is None:
            raise StopIteration
        return token

    def collect(self, on_token: OnToken | None = None) -> Completion:
        """Read to the end (calling ``on_token`` per Token) and return the whole answer."""
        with self:
            while (token := self._read()) is not None:
                self._notify(on_token, token)
        return self.completion

    def _read(self) -> generation_pb2.Token | None:
        if self._finished:
            return None
        while True:
            try:
                if not self._have_metadata:
                    self._on_metadata(self._call.initial_metadata())
                token = next(self._call, None)
                if self._is_id(token):
                    continue
                if token is not None and token.done:
                    next(self._call, None)  # the status: the call is over once `final` is set
                    if self.request_id is None:
                        self._on_trailers(self._call.trailing_metadata())
                break
            except grpc.RpcError as err:
                delay = self._resume_delay(err)
                if delay is None:
                    raise self._failure(err) from None
                time.sleep(delay)
                self._call = self._resumed_call()
            except BaseException:  # Ctrl-C while blocked: leave no call running
                self._close()
                raise
        return self._accept(token)


class Client(_BaseClient[TokenStream]):
    """Blocking tokenwire client; ``with Client() as client: ...``.

    Args:
        target: ``host:port`` of the server, any gRPC target URI (``dns:///name:port``
            gets every address the name resolves to), or several replicas' addresses (a
            list of ``IP:port``, or one string with commas); default
            ``$TOKENWIRE_TARGET``, else ``127.0.0.1:50051``.
        credentials: channel credentials; ``None`` (default) is a plaintext channel
            unless ``tls`` or ``root_certificates`` is given.
        tls: use TLS with the system's root certificates (or ``root_certificates``).
        root_certificates: PEM bundle to verify the server with; implies ``tls``.
        metadata: metadata sent with every call, e.g. ``{"authorization": "Bearer ..."}``.
        timeout: default deadline of every call, in seconds; ``None`` (default): none.
        options: gRPC channel options, overriding ``DEFAULT_CHANNEL_OPTIONS`` key by key.
        service_config: the channel's gRPC service config (a mapping or JSON text).
            The default, ``DEFAULT_SERVICE_CONFIG``, spreads calls over the target's
            addresses (``round_robin``) and retries, on another one, a call that failed
            UNAVAILABLE before its first token (3 attempts at most, backoff from 0.1 s);
            ``None``: gRPC's defaults (one address at a time, no retries).

    Every method takes ``timeout=`` (seconds; ``None``: no deadline; default: the
    client's) and ``metadata=`` (added to the client's).
    """

    def _make_channel(self) -> Any:
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=self.options)
        return grpc.secure_channel(self.target, self.credentials, options=self.options)

    def _open_stream(self, method: Any, kwargs: dict[str, Any],
                     resumer: Resumer | None = None) -> TokenStream:
        return TokenStream(method(**kwargs), kwargs["metadata"], resumer)

    def start(
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
        return self._run(self._prepare_start(request, timeout, metadata))

    def start_chat(
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
        return self._run(self._prepare_start(request, timeout, metadata))

    def cancel(
        self,
        stream_id: str,
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> bool:
        """Stop a resumable stream; True if it was still generating."""
        return self._run(self._prepare_cancel(stream_id, timeout, metadata))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def generate_text(
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
        return stream.collect(on_token)

    def chat_text(
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
        return stream.collect(on_token)

    def complete(
        self,
        model: str,
        prompt: str,
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[GenerateParams],
    ) -> Completion:
        """Generate through the unary Complete RPC (no streaming)."""
        return self._run(self._prepare_complete_generate(model, prompt, timeout, metadata, params))

    def complete_chat(
        self,
        model: str,
        messages: Sequence[MessageLike],
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
        **params: Unpack[ChatParams],
    ) -> Completion:
        """Chat through the unary Complete RPC (no streaming)."""
        return self._run(self._prepare_complete_chat(model, messages, timeout, metadata, params))

    def list_models(
        self, *, timeout: TimeoutLike = USE_DEFAULT, metadata: MetadataLike | None = None
    ) -> list[generation_pb2.Model]:
        """The models installed in the engine, most recently modified first."""
        return self._run(self._prepare_list_models(timeout, metadata))

    def embed(
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
        return self._run(
            self._prepare_embed(model, inputs, truncate, dimensions, keep_alive, timeout, metadata)
        )

    def health(
        self,
        service: str = "",
        *,
        timeout: TimeoutLike = USE_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> str:
        """The grpc.health.v1 status of ``service`` ("" = the server): "SERVING", ..."""
        return self._run(self._prepare_health(service, timeout, metadata))

    def _run(self, call: _Unary[_T]) -> _T:
        try:
            response, done = call.method.with_call(**call.kwargs)
        except grpc.RpcError as err:
            raise call.fail(err) from None
        return call.finish(response, done.initial_metadata(), done.trailing_metadata())
