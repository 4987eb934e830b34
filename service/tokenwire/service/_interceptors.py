"""The call guard: metadata size → request id → authentication → authorization →
admission → the handler → one access-log line.

grpc.aio interceptors see only the method name and metadata, so the guard
wraps each handler; the wrapper has the request (for the model name) and the
context (for the peer's certificate). The access log names the method,
caller, outcome and time; it never contains prompt or answer text.

A call whose metadata is over gRPC's own limit (only a client that never
acknowledged the server's SETTINGS can send one, see ``_http2``) is refused as
soon as grpc.aio resolves its handler, without waiting for its request message:
its handler is swapped for a request-streaming one, which grpc.aio starts at once.
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from ._admission import Admission, Overloaded, Ticket
from ._auth import AuthError, Caller, CallerRegistry, NotAuthenticated
from ._http2 import MAX_METADATA_BYTES, GarbageSweep, MetadataTooLarge, metadata_bytes
from ._metrics import Metrics
from ._status import (
    InitialMetadata,
    error_reason_var,
    initial_metadata_var,
    request_id_trailer,
    request_id_var,
    status_for,
)

__all__ = ["GuardInterceptor"]

log = logging.getLogger("tokenwire.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_SERVICE = "/tokenwire.v1.GenerationService/"
#: Methods that run the model and so take an admission slot.
MODEL_CALLS = frozenset(_SERVICE + m for m in ("Generate", "Chat", "Complete", "Embed"))
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _SAFE_ID.match(value):
            return value
    return uuid.uuid4().hex


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _model_of(request: Any) -> str | None:
    inner = request
    if hasattr(request, "WhichOneof") and request.DESCRIPTOR.name == "CompleteRequest":
        kind = request.WhichOneof("request")
        inner = getattr(request, kind) if kind else None
    model = getattr(inner, "model", None)
    return model if isinstance(model, str) else None


def _log_access(method: str, rid: str, who: str, outcome: str, took: float,
                metrics: Metrics | None) -> None:
    log.info("rpc method=%s rid=%s caller=%s outcome=%s ms=%.1f", method, rid,
             who, outcome, took * 1000, extra={"fields": {
                 "method": method, "request_id": rid, "caller": who,
                 "outcome": outcome, "ms": round(took * 1000, 1)}})
    if metrics is not None:
        metrics.call_ended(method, outcome,
                           None if outcome == "OK" else error_reason_var.get(), took)


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5000" / "ipv6:[::1]:5000" / "unix:..."
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else rest
    return f"peer:{host.strip('[]')}"


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        *,
        admission: Admission,
        registry: CallerRegistry | None = None,
        allowed_cert_names: Sequence[str] = (),
        mtls: bool = False,
        open_health: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self._admission = admission
        self._metrics = metrics
        self._registry = registry if registry is not None and registry.enabled else None
        self._allowed = tuple(allowed_cert_names)
        self._mtls = mtls
        self._auth_required = self._registry is not None or mtls
        self._open_health = open_health
        self._sweep = GarbageSweep()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        metadata = details.invocation_metadata
        rid = _request_id(metadata)
        size = metadata_bytes(metadata)
        if size > MAX_METADATA_BYTES:  # before anything else, whatever the method
            self._sweep.refused(size)
            return self._refuse_metadata(method, rid, size)
        handler = await continuation(details)
        if handler is None:
            return None
        metrics = self._metrics
        infrastructure = method.startswith(_OPEN_PREFIXES)
        needs_auth = self._auth_required and not (infrastructure and self._open_health)

        def wrap(behavior: Callable[..., Any],
                 deserialize: Callable[[bytes], Any] | None) -> Callable[..., Any]:
            async def guarded(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                request_id_var.set(rid)
                error_reason_var.set(None)
                context.set_trailing_metadata(request_id_trailer())
                initial = InitialMetadata((("x-request-id", rid),))
                initial_metadata_var.set(initial)
                model_call = method in MODEL_CALLS
                if not model_call:  # model calls send it once their upstream request is out
                    await initial.send(context)
                started = time.perf_counter()
                outcome, who = "OK", "-"
                ticket: Ticket | None = None
                try:
                    caller = self._authenticate(context, metadata) if needs_auth else None
                    who = caller.name if caller else _peer_host(context.peer())
                    try:
                        request = deserialize(raw) if deserialize is not None else raw
                    except Exception as exc:  # DecodeError: bad bytes, bad UTF-8, too deep
                        outcome = "INVALID_ARGUMENT"
                        await initial.send(context)
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"the request could not be decoded: {exc}")
                    if not infrastructure:
                        if caller is not None:
                            caller.check(method, _model_of(request))
                        self._admission.check_rate(who, caller.rate if caller else None,
                                                   caller.burst if caller else None)
                        if model_call:
                            ticket = await self._admission.admit(
                                who, max_streams=caller.max_streams if caller else None,
                                deadline=context.time_remaining())
                            if metrics is not None:
                                metrics.admitted()
                    result = await behavior(request, context)
                    await initial.send(context)  # a unary answer: before the response
                    return result
                except (AuthError, Overloaded) as exc:
                    status = status_for(exc)
                    outcome = status.code.name
                    await initial.send(context)
                    await context.abort(status.code, status.details, status.trailing_metadata)
                except asyncio.CancelledError:
                    outcome = "CANCELLED"
                    raise
                except BaseException:
                    code = context.code()
                    outcome = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
                    raise
                finally:
                    if ticket is not None:
                        ticket.release()
                        if metrics is not None:
                            metrics.released()
                    _log_access(method, rid, who, outcome, time.perf_counter() - started,
                                metrics)

            return guarded

        if inspect.isasyncgenfunction(handler.unary_stream) or handler.stream_stream \
                or handler.stream_unary:
            # Not wrapped (reflection, streams written with yield): still authenticated.
            return self._gate(handler, rid, metadata) if needs_auth else handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                wrap(handler.unary_unary, handler.request_deserializer), None,
                handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream, handler.request_deserializer), None,
                handler.response_serializer)
        return handler

    def _refuse_metadata(self, method: str, rid: str, size: int) -> grpc.RpcMethodHandler:
        """A handler that ends the call with METADATA_TOO_LARGE at once. It is
        request-streaming whatever the method is, so grpc.aio starts it without
        waiting for a request message; it keeps no reference to the metadata."""
        metrics = self._metrics

        async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
            request_id_var.set(rid)
            status = status_for(MetadataTooLarge(size))
            _log_access(method, rid, _peer_host(context.peer()), status.code.name, 0.0,
                        metrics)
            await context.abort(status.code, status.details, status.trailing_metadata)

        return grpc.stream_unary_rpc_method_handler(refuse)

    def _gate(self, handler: grpc.RpcMethodHandler, rid: str, metadata: Any) -> Any:
        """Authenticates, then delegates, for handlers the guard does not wrap."""
        guard = self

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id_var.set(rid)
            context.set_trailing_metadata(request_id_trailer())
            try:
                guard._authenticate(context, metadata)
            except AuthError as exc:
                status = status_for(exc)
                await context.abort(status.code, status.details, status.trailing_metadata)
            async for item in behavior(request, context):
                yield item

        if handler.stream_stream is not None:
            behavior = handler.stream_stream
            return grpc.stream_stream_rpc_method_handler(
                gated, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                gated, handler.request_deserializer, handler.response_serializer)
        return handler

    def _authenticate(self, context: grpc.aio.ServicerContext, metadata: Any) -> Caller:
        token = _bearer(metadata)
        if token is not None:
            caller = self._registry.by_token(token) if self._registry and token else None
            if caller is None:
                raise NotAuthenticated("the bearer token is not valid; send `authorization: "
                                       "Bearer <token>` with a token this server knows")
            return caller
        names = self._cert_names(context)
        if names:
            if self._allowed and not any(fnmatch.fnmatchcase(n, p) for n in names
                                         for p in self._allowed):
                raise NotAuthenticated(f"client certificate {names[0]!r} is not on this "
                                       "server's allow-list")
            known = self._registry.by_cert(names) if self._registry else None
            return known or Caller(name=names[0])
        raise NotAuthenticated("this server needs credentials: a bearer token in "
                               "`authorization: Bearer <token>` metadata"
                               + (" or a client certificate" if self._mtls else ""))

    @staticmethod
    def _cert_names(context: grpc.aio.ServicerContext) -> list[str]:
        auth = context.auth_context()
        names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
