"""The engines behind the gateway, one subpackage each, and what they share.

    _breaker       a circuit breaker per upstream
    _transport     the lean HTTP/1.1 client that streams an engine's answer
    ollama/        Ollama's native API (/api/generate, /api/chat, NDJSON)

Nothing above this package knows an engine's JSON.
"""

from ._base import Backend, Decode, Event, Final, StreamRequest

__all__ = ["Backend", "Decode", "Event", "Final", "StreamRequest"]
