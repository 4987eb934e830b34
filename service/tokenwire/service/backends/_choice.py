"""Where one attempt of a call goes: the upstreams' live state, the routing order, and a
call's attempts (the relay's opener and failover policy).

The order, for the candidates of a model (``Router.routes``), untried in this call:

1. healthy ones: the last health probe answered, the circuit is closed (or due its
   trial call), and no attempt ran out of its first-token limit since that probe. When
   none is healthy, every candidate, so that the caller gets the engine's own error and
   an upstream that came back is used before the next probe says so.
2. the best (lowest) ``priority`` tier that has a free slot (in-flight calls < slots);
   when every tier is full, the best tier.
3. in it: one with a free slot where the model is loaded (``/api/ps``, refreshed on the
   health probe), then the least loaded relative to its slots; weights share the calls
   among upstreams that are otherwise equal (weighted random).

``bench/routing.py`` measured a routed call at 3-4 µs of CPU more than the one-upstream
path over 4 upstreams (the target is 20).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from types import TracebackType

from tokenwire.v1 import generation_pb2 as pb

from .._exceptions import (
    FirstTokenTimeout,
    ModelNotFound,
    PermissionDenied,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from ._base import Backend, Event, StreamRequest
from ._upstreams import UpstreamSpec

__all__ = ["Call", "Route", "Upstream", "choose", "moves_on", "spellings"]

Route = tuple["Upstream", "str | None"]  # the upstream, and the model it receives (None: as asked)
log = logging.getLogger("tokenwire.service")


def spellings(model: str) -> tuple[str, ...]:
    """Ollama reads a name without a tag as ":latest": both spellings of one model."""
    if ":" not in model.rsplit("/", 1)[-1]:
        return model, model + ":latest"
    if model.endswith(":latest"):
        return model, model.removesuffix(":latest")
    return (model,)


def moves_on(exc: UpstreamError) -> bool:
    """Whether a failure before the first token sends the call to another upstream: this
    one is out or unwell (an outage), busy or rate limiting (503, 429; a spent quota too:
    another upstream has its own), refuses the gateway (401/403: its credentials, not the
    caller's), lacks the model (404: a discovered list can be out of date) or ran out of
    its first-token limit."""
    return exc.outage or isinstance(
        exc, UpstreamUnavailable | UpstreamRateLimited | FirstTokenTimeout | ModelNotFound
        | PermissionDenied)


class Upstream:
    """One configured upstream, its backend and its live state."""

    __slots__ = ("backend", "discovered", "discovered_at", "failover_timeout", "in_flight",
                 "listing_failed", "loaded", "name", "priority", "probe_ok", "slots", "spec",
                 "suspect", "weight")

    def __init__(self, spec: UpstreamSpec, backend: Backend, failover_timeout: float) -> None:
        self.backend = backend
        self.name = spec.name
        #: Calls (streams and embeds) running on it now.
        self.in_flight = 0
        #: The last health probe answered (True until the first probe says otherwise).
        self.probe_ok = True
        #: An attempt ran out of its first-token limit since the last good probe.
        self.suspect = False
        #: Models loaded now, both spellings (None: unknown, no preference).
        self.loaded: frozenset[str] | None = None
        #: ``discover = true``: the names its model list gave (None: not listed yet).
        self.discovered: frozenset[str] | None = None
        self.discovered_at = -math.inf
        self.listing_failed = False
        self.configure(spec, failover_timeout)

    def configure(self, spec: UpstreamSpec, failover_timeout: float) -> None:
        """Takes a reloaded table's routing settings (the backend stays)."""
        self.spec = spec
        self.priority = spec.priority
        self.slots = spec.slots
        self.weight = spec.weight
        self.failover_timeout = (failover_timeout if spec.failover_timeout is None
                                 else spec.failover_timeout)

    def usable(self) -> bool:
        return self.probe_ok and not self.suspect and self.backend.breaker.allows()

    @property
    def up(self) -> bool:
        """What health and the metric show: the probe answered and the circuit is closed."""
        return self.probe_ok and not self.backend.breaker.is_open

    def serves(self, name: str) -> bool:
        """Whether it serves ``name`` by its own models (aliases aside)."""
        if self.spec.discover:
            return self.discovered is not None and name in self.discovered
        return any(fnmatch.fnmatchcase(s, p) for s in spellings(name) for p in self.spec.models)


class _Counted:
    """An attempt's stream, counted in its upstream's in-flight calls while open."""

    __slots__ = ("_inner", "_upstream")

    def __init__(self, upstream: Upstream,
                 inner: AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]) -> None:
        self._upstream = upstream
        self._inner = inner

    async def __aenter__(self) -> AsyncIterator[tuple[Event, int]]:
        self._upstream.in_flight += 1
        try:
            return await self._inner.__aenter__()
        except BaseException:
            self._upstream.in_flight -= 1
            raise

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        try:
            return await self._inner.__aexit__(kind, exc, tb)
        finally:
            self._upstream.in_flight -= 1


class Call:
    """One model call's attempts: the relay's opener (each call opens the next attempt)
    and its failover policy (``_relay.Failover``)."""

    __slots__ = ("_request", "_rng", "_routes", "_tried", "rewritten", "upstream")

    def __init__(self, request: StreamRequest, routes: tuple[Route, ...],
                 rng: random.Random) -> None:
        self._rng = rng
        self._request = request
        self._routes = routes
        self._tried: list[Upstream] = []
        #: The upstream of the latest attempt (the one that served, once it did).
        self.upstream: Upstream | None = None
        #: That attempt sent the upstream another model name (an alias).
        self.rewritten = False

    def __call__(self) -> AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]:
        request = self._request
        route = choose(self._routes, request.model, self._tried, self._rng)
        if route is None:  # every candidate was tried: a retry starts a new round
            self._tried.clear()
            route = choose(self._routes, request.model, self._tried, self._rng)
            assert route is not None
        upstream, name = route
        self._tried.append(upstream)
        self.upstream = upstream
        self.rewritten = name is not None and name != request.model
        if name is not None and self.rewritten:
            request = _renamed(request, name)
        return _Counted(upstream, upstream.backend.stream(request))

    @property
    def upstream_name(self) -> str:
        return self.upstream.name if self.upstream is not None else ""

    # -- the relay's Failover ------------------------------------------------------

    def attempt_limit(self) -> float | None:
        """Seconds the attempt just opened may wait for its first token before the call
        moves on: its upstream's failover_timeout while another healthy candidate is
        left; None (the whole first-token wait) for the last one."""
        tried = self._tried
        for upstream, _ in self._routes:
            if upstream not in tried and upstream.usable():
                return self.upstream.failover_timeout if self.upstream is not None else None
        return None

    def expired(self, limit: float) -> UpstreamError:
        """The attempt's first-token limit ran out: its upstream is passed over until its
        next good health probe (which tells a loading engine from a hung one)."""
        name = self.upstream_name
        if self.upstream is not None:
            self.upstream.suspect = True
        return FirstTokenTimeout(f"upstream {name!r} sent no output within {limit:g}s "
                                 "(its failover_timeout)", outage=False)

    def failed(self, exc: UpstreamError) -> bool:
        """True when another candidate takes the next attempt now."""
        if not moves_on(exc):
            return False
        tried = self._tried
        left = sum(1 for upstream, _ in self._routes if upstream not in tried)
        if left:
            log.info("upstream %s failed before the first token (%s); %d other upstream(s) "
                     "left for this call", self.upstream_name, reason_of(exc), left)
        return left > 0


def reason_of(exc: BaseException) -> str:
    """The ErrorInfo reason (``UPSTREAM_UNREACHABLE``...) a log line names a failure by, as
    the call's status and the metrics do. (Imported when a failure is logged: _status
    imports the backends.)"""
    from .._status import reason_of as reason

    return reason(exc)


def _renamed(request: StreamRequest, model: str) -> StreamRequest:
    """A copy of ``request`` for ``model`` (an alias's name on one upstream)."""
    copy: StreamRequest = (pb.GenerateRequest() if isinstance(request, pb.GenerateRequest)
                           else pb.ChatRequest())
    copy.CopyFrom(request)  # type: ignore[arg-type]
    copy.model = model
    return copy


def choose(routes: tuple[Route, ...], model: str, tried: list[Upstream],
       rng: random.Random) -> Route | None:
    """The best untried candidate, in the order of the module docstring (steps 2-4)."""
    group = [r for r in routes if r[0] not in tried and r[0].usable()]
    if not group:
        group = [r for r in routes if r[0] not in tried]
        if not group:
            return None
    if len(group) == 1:
        return group[0]
    tier = min((r[0].priority for r in group if r[0].in_flight < r[0].slots), default=None)
    if tier is None:
        tier = min(r[0].priority for r in group)
    best: tuple[float, float, float] | None = None
    ties: list[Route] = []
    for route in group:
        upstream, name = route
        if upstream.priority != tier:
            continue
        loaded = upstream.loaded
        cold = 0.0 if loaded is None or (name or model) in loaded else 1.0
        ratio = upstream.in_flight / upstream.slots
        key = (0.0, cold, ratio) if upstream.in_flight < upstream.slots else (1.0, ratio, cold)
        if best is None or key < best:
            best, ties = key, [route]
        elif key == best:
            ties.append(route)
    if len(ties) == 1:
        return ties[0]
    total = sum(r[0].weight for r in ties)
    point = rng.random() * total
    for route in ties:
        point -= route[0].weight
        if point < 0:
            return route
    return ties[-1]
