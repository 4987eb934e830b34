"""Tracing: OpenTelemetry spans exported over OTLP, off unless configured.

With ``--otlp-endpoint`` (or the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_ENDPOINT``), every call gets a SERVER span whose parent is the
caller's W3C ``traceparent`` (and ``tracestate``) metadata, and every model call a
GenAI CLIENT span under it (``chat llama3``), whose ``traceparent`` goes to the engine
with the upstream request. ``_otel`` holds the OpenTelemetry SDK side and is imported
only then: with tracing off, this module is all that loads, and a call pays for a few
``is None`` checks and one context-variable read (README, Performance).

No span or event ever carries prompt or answer text: only names, counts, timings and
status (see ``_otel`` for the attribute list).
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is on
    from ._otel import CallSpan, Generation, Tracing

__all__ = ["call_span_var", "endpoint_from_env", "generation_var", "start_tracing"]

#: The current call's SERVER span (None: tracing is off, or not in a call).
call_span_var: contextvars.ContextVar[CallSpan | None] = contextvars.ContextVar(
    "tokenwire_call_span", default=None)
#: The current model call's GenAI span: the backends send its ``traceparent`` upstream.
generation_var: contextvars.ContextVar[Generation | None] = contextvars.ContextVar(
    "tokenwire_generation", default=None)

#: Packages ``--otlp-endpoint`` needs (the ``tracing`` extra).
NEEDS = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"


def endpoint_from_env(environ: Mapping[str, str]) -> str:
    """The OTLP endpoint the standard variables name ("" when none does, or when
    ``OTEL_SDK_DISABLED`` is true): the traces one wins over the general one."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = environ.get(name, "").strip()
        if value:
            return value
    return ""


def start_tracing(endpoint: str) -> Tracing | None:
    """The tracer exporting to ``endpoint`` (None when it is empty: tracing off)."""
    if not endpoint:
        return None
    from ._otel import Tracing

    return Tracing(endpoint)
