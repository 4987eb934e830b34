"""A circuit breaker for the upstream.

Closed: calls go through. After ``threshold`` consecutive failures that say
"Ollama is not there" (no connection, 5xx, dropped connections) it opens:
calls fail at once with UNAVAILABLE and health reports NOT_SERVING. After
``cooldown`` seconds it lets one call (or the health probe) through; success
closes it, failure opens it for another cooldown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .._exceptions import CircuitOpen

__all__ = ["CircuitBreaker"]

log = logging.getLogger("tokenwire.service")


class CircuitBreaker:
    def __init__(self, *, threshold: int = 5, cooldown: float = 5.0, url: str = "") -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._url = url
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        #: Called with True when the circuit opens and False when it closes.
        self.on_change: Callable[[bool], None] | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def before_call(self) -> None:
        """Raises CircuitOpen while open, except for one trial call per cooldown."""
        if self._opened_at is None or self.threshold <= 0:
            return
        waited = time.monotonic() - self._opened_at
        if waited >= self.cooldown and not self._probing:
            self._probing = True  # half-open: this call is the trial
            return
        retry = max(self.cooldown - waited, 0.1)
        raise CircuitOpen(
            f"Ollama at {self._url} failed {self._failures} times in a row; failing fast "
            f"for {retry:.1f}s more before trying again", retry_after=retry)

    def allows(self) -> bool:
        """Whether a call would go through now: ``before_call`` without its side effects
        (closed, or open and due its trial call). For routing."""
        if self._opened_at is None or self.threshold <= 0:
            return True
        return not self._probing and time.monotonic() - self._opened_at >= self.cooldown

    def abandon(self) -> None:
        """The trial call ended without an answer (its caller went away)."""
        self._probing = False

    def success(self) -> None:
        was_open = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._probing = False
        if was_open:
            log.info("circuit closed: Ollama at %s answers again", self._url)
            if self.on_change is not None:
                self.on_change(False)

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self.threshold > 0 and self._failures >= self.threshold:
            newly = self._opened_at is None
            self._opened_at = time.monotonic()
            if newly:
                log.warning("circuit open: %d consecutive upstream failures", self._failures)
                if self.on_change is not None:
                    self.on_change(True)
