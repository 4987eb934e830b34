"""How an OpenAI-compatible engine's error answers become exceptions: pure functions.

Who failed decides first, as for Ollama (``backends.ollama._errors``): a live engine
refusing this request is never an outage. Both error shapes are read (OpenAI's
``{"error": {"message", "type", "param", "code"}}`` and the flat vLLM/FastChat one).

    401 / 403                                PermissionDenied
    404 about the model                      ModelNotFound; other 404s: the URL is wrong
    429 insufficient_quota / billing         QuotaExhausted: not retryable
    429                                      UpstreamRateLimited, with the wait the engine
                                             named (Retry-After seconds or date,
                                             retry-after-ms, x-ms-retry-after-ms)
    503                                      UpstreamBusy (outage): llama.cpp loading, overload
    other 4xx                                InvalidRequest (``param`` names the field)
    500 + a well-formed error                InvalidRequest when it points at the request,
                                             else EngineError (not an outage)
    5xx without a well-formed error          UpstreamUnavailable (outage)
"""

from __future__ import annotations

import email.utils
import time

from ..._exceptions import (
    EngineError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    QuotaExhausted,
    UpstreamBusy,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
    excerpt,
)
from .._words import error_object, points_at_request

__all__ = ["classify_http_error", "retry_after"]

_TEXT_BYTES = 400
#: The API's parameter names -> the request field they came from.
_FIELDS = {"max_tokens": "options.max_tokens", "temperature": "options.temperature",
           "top_p": "options.top_p", "stop": "options.stop", "seed": "options.seed",
           "presence_penalty": "options.presence_penalty",
           "frequency_penalty": "options.frequency_penalty", "messages": "messages",
           "prompt": "prompt", "model": "model", "tools": "tools",
           "response_format": "format", "input": "inputs", "dimensions": "dimensions",
           "reasoning_effort": "think"}
_QUOTA = ("insufficient_quota", "billing_hard_limit_reached", "quota_exceeded")


def retry_after(headers: dict[str, str]) -> float | None:
    """Seconds the engine asked to wait: ``retry-after-ms``, ``x-ms-retry-after-ms``,
    then ``Retry-After`` (seconds or an HTTP date). None when it named none (Azure
    sends ``-1`` and ``0`` placeholders: not a wait)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 1e-3), ("x-ms-retry-after-ms", 1e-3),
                        ("retry-after", 1.0)):
        raw = lowered.get(name, "").strip()
        if not raw:
            continue
        try:
            seconds = float(raw) * scale
        except ValueError:
            if name != "retry-after":
                continue
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                continue
            seconds = when.timestamp() - time.time()
        if 0 < seconds < 24 * 3600:
            return seconds
    return None


def classify_http_error(status: int, body: bytes, headers: dict[str, str], model: str,
                        path: str) -> UpstreamError:
    error = error_object(body)
    said = error.get("message") if error is not None else None
    said = said if isinstance(said, str) and said.strip() else None
    code = str((error or {}).get("code") or (error or {}).get("type") or "")
    param = (error or {}).get("param")
    raw = said if said is not None else body.decode("utf-8", "replace").strip()
    text = excerpt(raw, _TEXT_BYTES)
    field = _FIELDS.get(param, "") if isinstance(param, str) else ""

    def rejected() -> InvalidRequest:
        return InvalidRequest(f"the engine rejected the request: {text}", http_status=status,
                              field=field)

    if status in (401, 403):
        return PermissionDenied(f"the engine refused the request with HTTP {status}"
                                + (f": {text}" if text else "") + "; check its API key",
                                http_status=status)
    if status == 404:
        if said is not None and ("model" in said.lower() or code == "model_not_found"):
            return ModelNotFound(model, f"model '{excerpt(model, 200)}' is not served by this "
                                        f"engine ({text}); choose one listed by ListModels",
                                 http_status=status)
        return EngineError(f"the engine answered 404 for {path} ({text or 'no body'}); does "
                           "its URL end in the API's base path (usually /v1)?",
                           http_status=status)
    if status == 429:
        if any(marker in code or marker in (said or "") for marker in _QUOTA):
            return QuotaExhausted(f"the engine's quota for this account is spent: {text}; "
                                  "retrying will not help until it is raised",
                                  http_status=status)
        return UpstreamRateLimited(f"the engine is rate limiting ({text or 'HTTP 429'}); "
                                   "retry later", retry_after=retry_after(headers),
                                   http_status=status)
    if status == 503:
        return UpstreamBusy(f"the engine is not ready or busy ({text or 'HTTP 503'}); retry "
                            "later", http_status=status)
    if 400 <= status < 500:
        return rejected()
    if status == 500 and said is not None:
        if points_at_request(said):
            return rejected()
        return EngineError(f"the engine could not run this request (HTTP 500): {text}",
                           http_status=status, outage=False)
    return UpstreamUnavailable(f"the engine failed with HTTP {status}: {text or 'no body'}",
                               http_status=status)
