"""Reading an engine's error answers, whatever the engine: what it said, and whether
its words point at the request. Pure functions, shared by every backend's classifier.
"""

from __future__ import annotations

import re

import orjson

__all__ = ["engine_said", "error_object", "points_at_request"]

#: Words by which an error text an engine gave with a 500 points at the request.
_POINTS_AT_REQUEST = re.compile(
    r"\b(invalid|must|expected|required|missing|unsupported|not supported|does not support"
    r"|exceeds?|exceeded|too (long|large|many|big)|schema|format|option|parameters?"
    r"|arguments?|fields?|unmarshal|malformed|not allowed|bad request)\b",
    re.IGNORECASE)


def points_at_request(text: str) -> bool:
    """Whether an engine's error text, which came with a 500, blames the request."""
    return _POINTS_AT_REQUEST.search(text) is not None


def error_object(body: bytes) -> dict[str, object] | None:
    """The error object of an answer in either shape engines use: OpenAI's
    ``{"error": {"message", "type", "param", "code"}}``, Ollama's ``{"error": "..."}``
    (as ``{"message": ...}``), or the flat ``{"object": "error", "message": ...}`` of
    older vLLM and FastChat-derived servers. None for anything else."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    error = value.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    if value.get("object") == "error" and "message" in value:
        return value
    return None


def engine_said(body: bytes) -> str | None:
    """The text of a well-formed error answer (``error_object``); None for anything
    else (HTML, plain text, empty)."""
    error = error_object(body)
    message = error.get("message") if error is not None else None
    return message if isinstance(message, str) and message.strip() else None
