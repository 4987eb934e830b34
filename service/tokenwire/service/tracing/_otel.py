"""The OpenTelemetry side of tracing: the SDK's tracer, OTLP/gRPC export, and the
attributes of tokenwire's spans. Imported only when tracing is on.

Spans, named as the OpenTelemetry semantic conventions name them (checked against
opentelemetry-semantic-conventions 0.66b2: the RPC conventions are a release candidate,
the GenAI ones still in development):

* one SERVER span per call, named after the method (``tokenwire.v1.GenerationService/
  Generate``), its parent the caller's ``traceparent``: ``rpc.system.name`` ``grpc``,
  ``rpc.method`` (fully qualified), ``rpc.response.status_code`` (``OK``,
  ``UNAVAILABLE``...), and the older keys tools still read, ``rpc.system``,
  ``rpc.service`` and ``rpc.grpc.status_code`` (the number); ``error.type`` and status
  ERROR for the codes that are the server's failures (UNKNOWN, DEADLINE_EXCEEDED,
  UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS); ``tokenwire.request_id``,
  ``tokenwire.caller`` (the caller's name in the callers file, or ``peer:<address>``),
  ``tokenwire.error.reason`` (the ErrorInfo reason of a failure).
* one GenAI CLIENT span per model call, ``{gen_ai.operation.name}
  {gen_ai.request.model}`` (``chat llama3``, ``text_completion llama3``, ``embeddings
  nomic-embed-text``), covering every attempt (retries, failover), as the GenAI
  conventions say: ``gen_ai.provider.name`` (``ollama``, ``openai`` for the
  OpenAI-compatible wire), ``gen_ai.request.*`` (model, max_tokens, temperature, top_p,
  top_k, seed, presence/frequency penalty), ``gen_ai.response.model``,
  ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens`` and
  ``output_tokens`` (the engine's counts), ``gen_ai.response.time_to_first_chunk``
  (seconds from the span's start to the engine's first chunk), ``server.address`` and
  ``server.port`` of the upstream that took the last attempt, ``tokenwire.upstream``,
  ``tokenwire.attempts``, ``error.type`` (our exception's class name) on failure; an
  event ``tokenwire.first_token`` at the first chunk's arrival, and one
  ``tokenwire.retry`` per attempt after the first (its upstream's name and address).

Never prompt or answer text, stop sequences, tool arguments, tokens or keys.

Export: OTLP over gRPC (opentelemetry-exporter-otlp-proto-grpc), which rides on
the grpcio and protobuf the server has anyway (the HTTP exporter would add requests
and urllib3), from the SDK's BatchSpanProcessor: a bounded queue drained by its own
thread, so a slow or absent collector costs dropped spans, never a waiting call. The
SDK reads the rest of the standard variables itself: OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*,
OTEL_EXPORTER_OTLP_HEADERS / _CERTIFICATE / _TIMEOUT / _INSECURE.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace as api
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tokenwire.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from .._relay import Relay

__all__ = ["CallSpan", "Generation", "Tracing"]

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_KEYS = ("traceparent", "tracestate")
#: gRPC codes that are the server's failures (semconv, gRPC server spans).
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL",
                            "UNAVAILABLE", "DATA_LOSS", "ERROR"})
_CODES = {code.name: code.value[0] for code in grpc.StatusCode}
#: Request options recorded, by the GenAI attribute they become.
_OPTIONS = (("max_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"), ("top_k", "gen_ai.request.top_k"),
            ("seed", "gen_ai.request.seed"),
            ("presence_penalty", "gen_ai.request.presence_penalty"),
            ("frequency_penalty", "gen_ai.request.frequency_penalty"))


def _finish_reason(value: int) -> str:
    try:
        name = pb.FinishReason.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix("FINISH_REASON_").lower()


class CallSpan:
    """One call's SERVER span, and the context its children start in."""

    __slots__ = ("context", "span")

    def __init__(self, span: api.Span) -> None:
        self.span = span
        self.context = api.set_span_in_context(span)

    def caller(self, who: str) -> None:
        self.span.set_attribute("tokenwire.caller", who)

    def link(self, traceparent: str) -> None:
        """Links this span to another one (a resumable stream's generation, perhaps
        in another trace, on another replica)."""
        context = api.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent}))
        linked = context.get_span_context()
        if linked.is_valid:
            self.span.add_link(linked, {"tokenwire.link": "generation"})

    def end(self, outcome: str, reason: str | None) -> None:
        """Ends the span with the call's status code name (``outcome``) and, for a
        failure, its ErrorInfo ``reason``."""
        span = self.span
        attributes: dict[str, str | int] = {"rpc.response.status_code": outcome}
        code = _CODES.get(outcome)
        if code is not None:
            attributes["rpc.grpc.status_code"] = code
        if reason:
            attributes["tokenwire.error.reason"] = reason
        if outcome in _SERVER_ERRORS:
            attributes["error.type"] = outcome
            span.set_status(Status(StatusCode.ERROR, reason or outcome))
        span.set_attributes(attributes)  # one lock, not one per attribute
        span.end()


class Generation:
    """One model call's GenAI CLIENT span."""

    __slots__ = ("_attempts", "_context", "_span", "_started")

    def __init__(self, span: api.Span) -> None:
        self._span = span
        self._context = api.set_span_in_context(span)
        self._started = time.perf_counter()
        self._attempts = 0

    def upstream(self, provider: str, address: str, port: int, name: str) -> dict[str, str]:
        """Notes the upstream an attempt goes to (a retry or failover is an event
        ``tokenwire.retry`` too); returns the headers that carry this span's context to
        it (``traceparent``, and ``tracestate`` when there is one)."""
        attributes: dict[str, str | int] = {
            "gen_ai.provider.name": provider, "server.address": address, "server.port": port,
            "tokenwire.upstream": name}
        self._attempts += 1
        if self._attempts > 1:
            self._span.add_event("tokenwire.retry", attributes)
        self._span.set_attributes(attributes)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=self._context)
        return carrier

    def traceparent(self) -> str:
        """This span's W3C traceparent."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=self._context)
        return carrier.get("traceparent", "")

    def end(self, relay: Relay | None = None, error: BaseException | None = None, *,
            input_tokens: int | None = None) -> None:
        """Ends the span with what ``relay`` saw (the final chunk's counts, the first
        chunk's time, the attempts), or with ``error``."""
        span = self._span
        attributes: dict[str, Any] = {}
        if relay is not None:
            attributes["tokenwire.attempts"] = relay.attempts
            if relay.count:  # the first chunk: the time to it, and an event at that moment
                first = relay.first_perf
                attributes["gen_ai.response.time_to_first_chunk"] = first - self._started
                ago = time.perf_counter() - first
                span.add_event("tokenwire.first_token",
                               timestamp=time.time_ns() - int(ago * 1e9))
            final = relay.final
            if final is not None:
                usage = final.usage
                attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
                attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
                attributes["gen_ai.response.finish_reasons"] = (
                    _finish_reason(final.finish_reason),)
                if final.model:
                    attributes["gen_ai.response.model"] = final.model
        if input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = input_tokens
        if error is not None:
            kind = type(error).__name__
            attributes["error.type"] = kind
            span.set_status(Status(StatusCode.ERROR, kind))
        span.set_attributes(attributes)
        span.end()


class Tracing:
    """The tracer of one server process, exporting to ``endpoint`` (OTLP/gRPC;
    ``http://`` plaintext, ``https://`` TLS). ``exporter`` replaces the OTLP one
    (tests, benchmarks)."""

    def __init__(self, endpoint: str, *, exporter: SpanExporter | None = None) -> None:
        base = Resource.create()
        extra: dict[str, str] = {}
        if str(base.attributes.get("service.name", "")).startswith("unknown_service"):
            extra["service.name"] = "tokenwire"  # unless OTEL_SERVICE_NAME names it
        if "service.instance.id" not in base.attributes:  # one per replica and worker
            extra["service.instance.id"] = uuid.uuid4().hex
        self.provider = TracerProvider(resource=base.merge(Resource(extra)))
        self.endpoint = endpoint
        self.provider.add_span_processor(BatchSpanProcessor(
            exporter if exporter is not None else OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self.provider.get_tracer("tokenwire.service")

    def server(self, method: str, metadata: Iterable[Any] | None, rid: str) -> CallSpan:
        """A call's SERVER span; its parent is the caller's ``traceparent``, if any."""
        carrier = {key: value for key, value in metadata or () if key in _TRACE_KEYS}
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        name = method.lstrip("/")
        service, _, short = name.partition("/")
        return CallSpan(self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes={
                "rpc.system.name": "grpc", "rpc.method": name,
                "rpc.system": "grpc", "rpc.service": service,
                "tokenwire.request_id": rid}))

    def generation(self, operation: str, request: Any, parent: CallSpan | None, *,
                   resumable: bool = False) -> Generation:
        """A model call's GenAI span, the child of ``parent`` (the call's span);
        ``request`` is a Generate, Chat or Embed request (only its model and options
        are read); ``resumable``: the generation of a resumable stream."""
        model = request.model
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation,
                                      "gen_ai.request.model": model}
        if operation == "embeddings":
            if request.HasField("dimensions"):
                attributes["gen_ai.embeddings.dimension.count"] = request.dimensions
        else:
            options = request.options
            for field, key in _OPTIONS:
                if options.HasField(field):
                    attributes[key] = getattr(options, field)
            if resumable:
                attributes["tokenwire.resumable"] = True
        return Generation(self._tracer.start_span(
            f"{operation} {model}", context=parent.context if parent is not None else None,
            kind=SpanKind.CLIENT, attributes=attributes))

    def shutdown(self) -> None:
        """Exports what is queued and stops the exporter's thread (blocks: the SDK
        gives an unreachable collector up to 30 s)."""
        self.provider.shutdown()

    async def close(self, within: float = 3.0) -> None:
        """``shutdown`` in a thread of its own, waited for ``within`` seconds at most: a
        collector that is down must not hold a stopping server (the thread is a daemon,
        so the process exits whatever it is doing)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed already
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=run, name="tokenwire-otel-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, within)
