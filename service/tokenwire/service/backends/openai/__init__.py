"""OpenAI-compatible engines: hosted APIs, vLLM, llama.cpp's server, Ollama's ``/v1``.

    _adapter       the HTTP calls (Server-Sent Event streams, JSON endpoints)
    _payloads      tokenwire requests as chat or text completion payloads; what the
                   API cannot take is refused, naming the field and the backend
    _answers       the streams' events decoded (tool calls assembled by index, the
                   finish reason, usage), model lists and embeddings
    _errors        how the engine's error answers become exceptions
"""

from ._adapter import OpenAIBackend

__all__ = ["OpenAIBackend"]
