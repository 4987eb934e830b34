"""The engines behind the gateway, one subpackage each, and what they share.

    _breaker       a circuit breaker per upstream
    _transport     the lean HTTP/1.1 client that streams an engine's answer
    _http          the HTTP engine base: bounded JSON calls, streams, breaker bookkeeping
    _words         reading an engine's error words, whatever the engine
    ollama/        Ollama's native API (/api/generate, /api/chat, NDJSON)
    openai/        OpenAI-compatible APIs (/v1/chat/completions, Server-Sent Events)
    _upstreams     the upstreams file (--upstreams-file), checked and watched
    _factory       the backend object of each configured upstream, by kind
    _router        which upstreams serve a model; probes, discovery, reloads; merged
                   model lists and embeds
    _choice        where one attempt goes (health, tier, slots, loaded model, weight),
                   and a call's attempts (the relay's opener and failover)

Nothing above this package knows an engine's JSON.
"""

from ._base import Backend, Decode, Event, Final, StreamRequest

__all__ = ["Backend", "Decode", "Event", "Final", "StreamRequest"]
