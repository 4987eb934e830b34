"""The call guard: request id → authentication → authorization → admission →
the handler → one access-log line.

grpc.aio interceptors see only the method name and metadata, so the guard
wraps each handler; the wrapper has the request (for the model name) and the
context (for the peer's certificate). Every handler is wrapped, whatever its
shape, so every method gets the same request id, authentication, decoding
(undecodable bytes are INVALID_ARGUMENT, never UNKNOWN) and access log. The
access log names the method, caller, outcome and time; it never contains
prompt or answer text. With tracing on, the call's SERVER span starts and ends here too
(its parent is the caller's ``traceparent``); with it off, that costs one ``is None``.

With load reports on (``orca``), a model call's trailers end with the process's load
report: set when the call ends, or made with the error status that ends it.

A call whose metadata is over gRPC's own limit (only a client that never
acknowledged the server's SETTINGS can send one, see ``_http2``) is refused as
soon as grpc.aio resolves its handler, without waiting for its request message:
its handler is swapped for a request-streaming one, which grpc.aio starts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fnmatch
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from .._metrics import Metrics
from .._status import (
    InitialMetadata,
    Undecodable,
    error_reason_var,
    initial_metadata_var,
    request_id_trailer,
    request_id_var,
    status_for,
)
from .._validate import ValidationFailed
from ..orca import LoadMeter, load_var
from ..tracing import call_span_var
from ._admission import Admission, Overloaded
from ._auth import AuthError, Caller, CallerRegistry, NotAuthenticated, caller_var, principal_var
from ._budget import Spend, stream_request
from ._gate import Gate, LimitsUnavailable, Pass
from ._http2 import MAX_METADATA_BYTES, GarbageSweep, MetadataTooLarge, metadata_bytes

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is on
    from ..tracing._otel import CallSpan, Tracing

__all__ = ["GuardInterceptor", "spend_var", "take_admission"]

log = logging.getLogger("tokenwire.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_SERVICE = "/tokenwire.v1.GenerationService/"
#: Methods that run the model and so take an admission slot.
MODEL_CALLS = frozenset(_SERVICE + m for m in ("Generate", "Chat", "Complete", "Embed",
                                               "Start"))
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _SAFE_ID.match(value):
            return value
    return uuid.uuid4().hex


#: RFC 6750's b64token: what may follow "Bearer " (and nothing else may).
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_BEARER_FORM = ("send exactly one `authorization` metadata entry, `Bearer <token>`: the "
                "scheme (any case), one space, the token (letters, digits, -._~+/, "
                "optionally = at the end), nothing before or after")


def _bearer(metadata: Any) -> str | None:
    """The bearer token, None when no `authorization` entry was sent. Ambiguous
    credentials are refused, not guessed at, as strict gateways do: several entries
    (which one would a proxy in front have checked?), or a value that is not exactly
    ``Bearer <token>``. The refusal never repeats the value."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise NotAuthenticated(f"{len(values)} `authorization` metadata entries; "
                               + _BEARER_FORM)
    value = values[0]
    scheme, _, token = value.partition(" ") if isinstance(value, str) else ("", "", "")
    if scheme.lower() != "bearer" or not _B64TOKEN.fullmatch(token):
        raise NotAuthenticated("the `authorization` metadata is not a bearer token; "
                               + _BEARER_FORM)
    return token


def _model_of(request: Any) -> str | None:
    inner = request
    if hasattr(request, "WhichOneof") and request.DESCRIPTOR.name == "CompleteRequest":
        kind = request.WhichOneof("request")
        inner = getattr(request, kind) if kind else None
    model = getattr(inner, "model", None)
    return model if isinstance(model, str) else None


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5000" / "ipv6:[::1]:5000" / "unix:..."
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else rest
    return f"peer:{host.strip('[]')}"


def _strict(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's decoder, raising Undecodable for bytes that are no such message."""
    if deserialize is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError: bad bytes, bad UTF-8, nested too deep
            raise Undecodable(exc) from None

    return decode


class _Plan:
    """What the guard decides for one call from its method and metadata alone, before
    the handler runs, and the wrappers that apply it."""

    __slots__ = ("guard", "infrastructure", "metadata", "method", "model_call", "needs_auth",
                 "rid")

    def __init__(self, guard: GuardInterceptor, method: str, metadata: Any) -> None:
        self.guard = guard
        self.method = method
        self.metadata = metadata
        self.rid = _request_id(metadata)
        self.infrastructure = method.startswith(_OPEN_PREFIXES)
        self.model_call = method in MODEL_CALLS
        self.needs_auth = guard._auth_required and not (self.infrastructure
                                                        and guard._open_health)

    def wrap(self, behavior: Callable[..., Any],
             decode: Callable[[bytes], Any] | None) -> Callable[..., Any]:
        """A wrapper of the same kind as ``behavior``: an async generator for one
        written with ``yield``, a coroutine for one that writes with ``context.write``."""
        if inspect.isasyncgenfunction(behavior):
            return self.generator(behavior, decode)
        return self.coroutine(behavior, decode)

    def coroutine(self, behavior: Callable[..., Any],
                  decode: Callable[[bytes], Any] | None) -> Callable[..., Any]:
        async def guarded(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self, context)
            try:
                request = await call.begin(raw, decode)
                result = await behavior(request, context)
                await call.initial.send(context)  # a unary answer: before the response
                return result
            except BaseException as exc:
                await call.failed(exc)
                raise
            finally:
                call.end()

        return guarded

    def generator(self, behavior: Callable[..., Any],
                  decode: Callable[[bytes], Any] | None) -> Callable[..., Any]:
        async def guarded(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self, context)
            try:
                request = await call.begin(raw, decode)
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except BaseException as exc:
                await call.failed(exc)
                raise
            finally:
                call.end()

        return guarded


def take_admission() -> Callable[[], None] | None:
    """Takes the current call's admission slot over: the call no longer gives it back
    when it ends; whoever calls the function returned does (once). For work that
    outlives its call, such as a resumable stream's generation. None when the call
    holds no slot."""
    call = _call_var.get()
    if call is None or call.ticket is None:
        return None
    ticket, call.ticket = call.ticket, None
    metrics = call.plan.guard._metrics

    def release() -> None:
        ticket.release()
        if metrics is not None:
            metrics.released()

    return release


class _Call:
    """One call from the guard's point of view: request id, caller, admission ticket,
    outcome, and the access-log line at its end."""

    __slots__ = ("context", "initial", "load", "outcome", "plan", "span", "started", "ticket",
                 "who")

    def __init__(self, plan: _Plan, context: grpc.aio.ServicerContext) -> None:
        self.plan = plan
        self.context = context
        request_id_var.set(plan.rid)
        error_reason_var.set(None)
        context.set_trailing_metadata(request_id_trailer())
        # First-token order: every tokenwire call sends its headers with its first message
        # (a model call's first Token, a unary call's answer), so that its failures before
        # it are trailers-only; health and reflection send them at once.
        self.initial = InitialMetadata((("x-request-id", plan.rid),), early=(
            plan.guard._early_headers or not plan.method.startswith(_SERVICE)))
        initial_metadata_var.set(self.initial)
        self.started = time.perf_counter()
        self.outcome = "OK"
        self.who = "-"
        self.ticket: Pass | None = None
        _call_var.set(self)
        tracing = plan.guard._tracing
        self.span: CallSpan | None = None
        if tracing is not None and not plan.infrastructure:  # no spans for health checks
            self.span = tracing.server(plan.method, plan.metadata, plan.rid)
            call_span_var.set(self.span)
        self.load = plan.guard._load if plan.model_call else None
        if self.load is not None:  # its errors' statuses carry the report too
            self.load.arrived()
            load_var.set(self.load)

    async def begin(self, raw: Any, decode: Callable[[bytes], Any] | None) -> Any:
        """Authenticates, decodes a unary request, applies policy and admission.
        Returns the request for the handler (a request stream is passed as it is)."""
        plan, context, guard = self.plan, self.context, self.plan.guard
        if not plan.model_call:  # model calls send it once their upstream request is out
            await self.initial.send_early(context)
        caller = guard._authenticate(context, plan.metadata) if plan.needs_auth else None
        self.who = caller.name if caller else _peer_host(context.peer())
        if self.span is not None:
            self.span.caller(self.who)
        caller_var.set(caller)
        principal_var.set(self.who)
        request = decode(raw) if decode is not None else raw
        if not plan.infrastructure:
            if caller is not None:
                caller.check(plan.method, _model_of(request) if decode is not None else None)
            # Without authentication a caller is only a peer address: per-peer limits.
            if plan.model_call and caller is not None and caller.max_output_tokens:
                _check_output_cap(request, caller)
            self.ticket = await guard._gate.check(
                self.who, anonymous=caller is None, request=request,
                model_call=plan.model_call,
                max_streams=caller.max_streams if caller else None,
                rate=caller.rate if caller else None, burst=caller.burst if caller else None,
                budget=caller.budget if caller else None,
                output_cap=caller.max_output_tokens if caller else None,
                deadline=context.time_remaining())
            if self.ticket is not None:
                spend_var.set(self.ticket.spend)
                if guard._metrics is not None:
                    guard._metrics.admitted()
        return request

    async def failed(self, exc: BaseException) -> None:
        """Ends the call with the guard's own status (refusals, undecodable bytes), or
        notes how the handler ended it."""
        if isinstance(exc, AuthError | Overloaded | Undecodable | LimitsUnavailable
                      | ValidationFailed):
            status = status_for(exc)
            self.outcome = status.code.name
            await self.initial.send_early(self.context)  # first-token order: trailers-only
            await self.context.abort(status.code, status.details, status.trailing_metadata)
        elif isinstance(exc, asyncio.CancelledError):
            self.outcome = "CANCELLED"
        else:
            code = self.context.code()
            self.outcome = code.name if isinstance(code, grpc.StatusCode) else "ERROR"

    def end(self) -> None:
        metrics = self.plan.guard._metrics
        load = self.load
        if load is not None:
            if self.outcome == "OK":  # (an error's status went out with its own report)
                self.context.set_trailing_metadata(request_id_trailer() + load.trailer())
            spend = spend_var.get()
            load.ended(self.outcome, spend.output if spend is not None else 0)
        if self.ticket is not None:
            self.ticket.release()
            if metrics is not None:
                metrics.released()
        _log_access(self.plan.method, self.plan.rid, self.who, self.outcome,
                    time.perf_counter() - self.started, metrics)
        if self.span is not None:
            self.span.end(self.outcome, None if self.outcome == "OK" else
                          error_reason_var.get())


_call_var: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "tokenwire_guarded_call", default=None)
#: What the current model call used, for settling its token budget: the servicer
#: reports the engine's figures to it, or the relay it reads (None: not a model call).
spend_var: contextvars.ContextVar[Spend | None] = contextvars.ContextVar(
    "tokenwire_spend", default=None)


def _check_output_cap(request: Any, caller: Caller) -> None:
    """A request may not ask for more output than its caller's ``max_output_tokens``;
    one that asks for none gets that cap."""
    inner = stream_request(request)
    cap = caller.max_output_tokens
    if inner is None or cap is None:
        return
    options = inner.options
    if options.HasField("max_tokens"):
        if not 0 <= options.max_tokens <= cap:
            raise ValidationFailed([("options.max_tokens", f"at most {cap} (caller "
                                     f"'{caller.name}''s max_output_tokens), got "
                                     f"{options.max_tokens}")])
    else:
        options.max_tokens = cap


#: What a refused call to a method this server does not serve is logged and counted as.
_UNKNOWN_METHOD = "unknown"


def _log_access(method: str, rid: str, who: str, outcome: str, took: float,
                metrics: Metrics | None) -> None:
    """The call's access-log line, and its end in the metrics, in one vocabulary: the bare
    method name (``Generate``, ``Check``), the status code's name, and for a failed call
    the ErrorInfo reason its status carries (``UPSTREAM_UNREACHABLE``)."""
    name = method[method.rfind("/") + 1:]
    reason = None if outcome == "OK" else error_reason_var.get()
    ms = took * 1000
    if reason is None:
        log.info("rpc method=%s rid=%s caller=%s outcome=%s ms=%.1f", name, rid, who, outcome,
                 ms, extra={"fields": {"method": name, "request_id": rid, "caller": who,
                                       "outcome": outcome, "ms": round(ms, 1)}})
    else:
        log.info("rpc method=%s rid=%s caller=%s outcome=%s reason=%s ms=%.1f", name, rid, who,
                 outcome, reason, ms, extra={"fields": {
                     "method": name, "request_id": rid, "caller": who, "outcome": outcome,
                     "reason": reason, "ms": round(ms, 1)}})
    if metrics is not None:
        metrics.call_ended(name, outcome, reason, took)


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler the server has, whatever its shape (unary or streaming
    request, a coroutine or an async generator): one set of rules for tokenwire's
    methods, health and reflection alike, and for anything registered later."""

    def __init__(
        self,
        *,
        admission: Admission | Gate,
        registry: CallerRegistry | None = None,
        allowed_cert_names: Sequence[str] = (),
        mtls: bool = False,
        open_health: bool = False,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        load: LoadMeter | None = None,
        early_headers: bool = False,
    ) -> None:
        self._tracing = tracing
        #: --initial-metadata early: model calls send their headers before the first
        #: token and before an error status (see ``InitialMetadata``).
        self._early_headers = early_headers
        self._gate = admission if isinstance(admission, Gate) else Gate(admission)
        self._metrics = metrics
        #: Per-call load reports (ORCA) in the trailers of model calls; None: off.
        self._load = load
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
        size = metadata_bytes(details.invocation_metadata)
        if size > MAX_METADATA_BYTES:  # before anything else, whatever the method
            self._sweep.refused(size)
            # The path is the caller's to choose: a method this server lacks is "unknown"
            # in the log and the metrics, so made-up names cannot add label values.
            served = await continuation(details) is not None
            return self._refuse_metadata(details.method if served else _UNKNOWN_METHOD,
                                         _request_id(details.invocation_metadata), size)
        handler = await continuation(details)
        if handler is None:
            return None
        plan = _Plan(self, details.method, details.invocation_metadata)
        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        # A unary request is decoded by the guard itself (grpc.aio would decode it before
        # any wrapper runs and answer a failure with UNKNOWN); a request stream is decoded
        # message by message as the handler reads it, by a decoder that raises Undecodable,
        # which the wrapper turns into INVALID_ARGUMENT.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                plan.coroutine(handler.unary_unary, _strict(deserialize)), None, serialize)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                plan.wrap(handler.unary_stream, _strict(deserialize)), None, serialize)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                plan.coroutine(handler.stream_unary, None), _strict(deserialize), serialize)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                plan.wrap(handler.stream_stream, None), _strict(deserialize), serialize)
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

    def _authenticate(self, context: grpc.aio.ServicerContext, metadata: Any) -> Caller:
        """The caller, from a bearer token and/or a client certificate. A certificate
        must pass the allow-list whether or not a token comes with it; a token and a
        certificate that name different callers are refused."""
        token = _bearer(metadata)
        names = self._cert_names(context)
        if names and self._allowed and not any(fnmatch.fnmatchcase(n, p) for n in names
                                               for p in self._allowed):
            raise NotAuthenticated(f"client certificate {names[0]!r} is not on this "
                                   "server's allow-list")
        named = self._registry.by_cert(names) if names and self._registry else None
        if token is not None:
            caller = self._registry.by_token(token) if self._registry else None
            if caller is None:
                raise NotAuthenticated("the bearer token is not valid; send `authorization: "
                                       "Bearer <token>` with a token this server knows")
            if named is not None and named.name != caller.name:
                raise NotAuthenticated(f"the bearer token is not the one of caller "
                                       f"'{named.name}', whom the client certificate "
                                       f"{names[0]!r} names; send that caller's token, or "
                                       "none")
            return caller
        if names:
            return named or Caller(name=names[0])
        raise NotAuthenticated("this server needs credentials: a bearer token in "
                               "`authorization: Bearer <token>` metadata"
                               + (" or a client certificate" if self._mtls else ""))

    @staticmethod
    def _cert_names(context: grpc.aio.ServicerContext) -> list[str]:
        auth = context.auth_context()
        names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
