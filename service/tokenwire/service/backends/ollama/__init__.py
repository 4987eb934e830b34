"""Ollama's native HTTP API.

    _adapter       the HTTP calls (streams, JSON endpoints), every failure as our exception
    _wire          tokenwire requests as Ollama payloads; Ollama's answers as tokenwire values
    _errors        how Ollama's error answers become exceptions (who failed, then the words)
"""

from ._adapter import OllamaBackend

__all__ = ["OllamaBackend"]
