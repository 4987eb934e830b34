"""tokenwire server: a grpc.aio gateway that streams tokens from Ollama."""

from __future__ import annotations

from ._config import Settings, ollama_url_from_env, parse_settings
from ._exceptions import (
    EngineError,
    FirstTokenTimeout,
    IdleTimeout,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    ProtocolError,
    QuotaExhausted,
    RequestTimeout,
    RunnerCrashed,
    StreamError,
    TruncatedStream,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ._server import SERVICE_NAME, Runtime, build_server, serve
from ._servicer import GenerationServicer, StreamSettings
from ._status import STATUS_TABLE, status_for
from ._validate import Limits, ValidationFailed
from .backends import Backend, Event, Final
from .backends.ollama import OllamaBackend

__all__ = [
    "Backend",
    "Event",
    "Final",
    "SERVICE_NAME",
    "STATUS_TABLE",
    "EngineError",
    "FirstTokenTimeout",
    "GenerationServicer",
    "IdleTimeout",
    "InvalidRequest",
    "Limits",
    "ModelNotFound",
    "OllamaBackend",
    "PermissionDenied",
    "ProtocolError",
    "QuotaExhausted",
    "RequestTimeout",
    "RunnerCrashed",
    "Runtime",
    "Settings",
    "StreamError",
    "StreamSettings",
    "TruncatedStream",
    "UpstreamBusy",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "ValidationFailed",
    "build_server",
    "ollama_url_from_env",
    "parse_settings",
    "serve",
    "status_for",
]
