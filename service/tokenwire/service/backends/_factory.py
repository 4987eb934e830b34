"""Builds the backend object of one configured upstream.

``build_backend`` is the one place that knows which class serves which ``kind``. Keys
are read here, when an upstream is built, from the environment variable or file its
table names; a key is passed to the backend and kept nowhere else (not in the spec,
not in messages).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from .._config import redact_url
from ._base import Backend
from ._breaker import CircuitBreaker
from ._upstreams import UpstreamsFileError, UpstreamSpec
from .ollama import OllamaBackend
from .openai import OpenAIBackend

__all__ = ["BackendOptions", "build_backend", "read_api_key"]


@dataclass(frozen=True)
class BackendOptions:
    """What every upstream's backend gets from the flags."""

    connect_timeout: float = 5.0
    max_connections: int = 1000
    unary_timeout: float = 120.0
    max_body_bytes: int = 128 << 20
    breaker_threshold: int = 5
    breaker_cooldown: float = 5.0
    #: Verifies https:// upstreams that name no ca_file of their own (--upstream-ca-file).
    ssl_context: ssl.SSLContext | None = None

    def breaker(self, url: str) -> CircuitBreaker:
        return CircuitBreaker(threshold=self.breaker_threshold, cooldown=self.breaker_cooldown,
                              url=redact_url(url))


def read_api_key(spec: UpstreamSpec) -> str | None:
    """The upstream's key from where its table says (None: it has none); raises
    UpstreamsFileError without ever quoting the value."""
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env, "").strip()
        if not key:
            raise UpstreamsFileError(
                f"{spec.where} api_key_env: the environment variable {spec.api_key_env} is "
                "not set (or empty) in the server's environment")
        return key
    if spec.api_key_file:
        try:
            with open(spec.api_key_file, encoding="utf-8") as file:
                key = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UpstreamsFileError(
                f"{spec.where} api_key_file: cannot read {spec.api_key_file} ({reason})"
            ) from None
        if not key:
            raise UpstreamsFileError(f"{spec.where} api_key_file: {spec.api_key_file} is empty")
        return key
    return None


def _trust(spec: UpstreamSpec, options: BackendOptions) -> ssl.SSLContext | None:
    if spec.ca_file:
        return ssl.create_default_context(cafile=spec.ca_file)
    return options.ssl_context


def build_backend(spec: UpstreamSpec, options: BackendOptions) -> Backend:
    """A new backend for ``spec``, with a circuit breaker of its own."""
    common = {
        "name": spec.name,
        "connect_timeout": options.connect_timeout,
        "max_connections": options.max_connections,
        "unary_timeout": options.unary_timeout,
        "max_body_bytes": options.max_body_bytes,
        "breaker": options.breaker(spec.url),
        "ssl_context": _trust(spec, options),
    }
    if spec.kind == "openai":
        return OpenAIBackend(spec.url, api_key=read_api_key(spec), flavor=spec.flavor,
                             **common)  # type: ignore[arg-type]
    return OllamaBackend(spec.url, **common)  # type: ignore[arg-type]
