"""Server interceptors: request ids and one access-log line per call.

The access log names the method, model-free outcome and timings; it never
contains prompt or answer text.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ._status import request_id_var

__all__ = ["RequestInterceptor"]

log = logging.getLogger("tokenwire.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _SAFE_ID.match(value):
            return value
    return uuid.uuid4().hex


class RequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Gives each call a request id (the caller's ``x-request-id`` if it sent a
    sane one), returns it in initial metadata and logs the call's outcome."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        rid = _request_id(details.invocation_metadata)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                request_id_var.set(rid)
                await context.send_initial_metadata((("x-request-id", rid),))
                started = time.perf_counter()
                outcome = "OK"
                try:
                    return await behavior(request, context)
                except asyncio.CancelledError:
                    outcome = "CANCELLED"
                    raise
                except BaseException:
                    code = context.code()
                    outcome = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
                    raise
                finally:
                    log.info("rpc method=%s rid=%s outcome=%s ms=%.1f", method, rid, outcome,
                             (time.perf_counter() - started) * 1000)

            return wrapped

        if inspect.isasyncgenfunction(handler.unary_stream):
            return handler  # streaming via yield (none of ours): passed through unchanged
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                wrap(handler.unary_unary), handler.request_deserializer,
                handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        return handler
