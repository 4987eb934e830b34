"""Which upstream takes a call, and the next one when it fails before its first token.

Per call (``Router.call``, ``Router.embed``):

1. candidates: the upstreams that serve the model the request names. An alias lists its
   own (each with the model name that upstream receives); any other name is served by
   the upstreams whose ``models`` patterns match it, or whose discovered model list has
   it ("x" and "x:latest" are one model). The request never names an upstream: what a
   caller may reach follows from the public model name, which its policy checks.
2. healthy ones: the last health probe answered, the circuit is closed (or due its
   trial call), and no attempt ran out of its first-token limit since that probe. When
   none is healthy, every candidate, so that the caller gets the engine's own error and
   an upstream that came back is used before the next probe says so.
3. the best (lowest) ``priority`` tier that has a free slot (in-flight calls < slots);
   when every tier is full, the best tier.
4. in it: one with a free slot where the model is loaded (``/api/ps``, refreshed on the
   health probe), then the least loaded relative to its slots; weights share the calls
   among upstreams that are otherwise equal (weighted random).

Failover: a failure before the first token after which another upstream may do better
(``moves_on``: no connection, 503, 429, a crashed runner, a 404 for the model, an
upstream that refuses the gateway, no first token within its ``failover_timeout`` while
another healthy upstream is left) sends the next attempt to the next candidate at once,
within the first-token wait and the caller's deadline. The relay makes attempts only
before the first chunk, so nothing reaches the caller twice. Once every candidate was
tried, ``--upstream-retries`` retries (with backoff) start a new round.

Measured: choosing among 4 upstreams costs a few microseconds per call (README,
Performance); the one-upstream shortcut (``--ollama-url``) skips routing altogether.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType

from tokenwire.v1 import generation_pb2 as pb

from .._exceptions import (
    FirstTokenTimeout,
    ModelNotFound,
    PermissionDenied,
    UpstreamError,
    UpstreamUnavailable,
    excerpt,
)
from ._base import Backend, Event, StreamRequest
from ._upstreams import (
    UpstreamsConfig,
    UpstreamsFile,
    UpstreamsFileError,
    UpstreamSpec,
    is_pattern,
)

__all__ = ["Call", "Router", "Upstream", "moves_on", "spellings"]

log = logging.getLogger("tokenwire.service")

Route = tuple["Upstream", "str | None"]  # the upstream, and the model it receives (None: as asked)
Factory = Callable[[UpstreamSpec], Backend]
_MAX_CACHED = 4096  # model names (callers' strings) whose routes are kept
_RELIST = 5.0  # seconds between tries of a model list that failed


def spellings(model: str) -> tuple[str, ...]:
    """Ollama reads a name without a tag as ":latest": both spellings of one model."""
    if ":" not in model.rsplit("/", 1)[-1]:
        return model, model + ":latest"
    if model.endswith(":latest"):
        return model, model.removesuffix(":latest")
    return (model,)


def moves_on(exc: UpstreamError) -> bool:
    """Whether a failure before the first token sends the call to another upstream: this
    one is out or unwell (an outage), busy or rate limiting (503, 429), refuses the
    gateway (401/403: its credentials, not the caller's), lacks the model (404: a
    discovered list can be out of date) or ran out of its first-token limit."""
    return exc.outage or isinstance(
        exc, UpstreamUnavailable | FirstTokenTimeout | ModelNotFound | PermissionDenied)


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

    __slots__ = ("_request", "_router", "_routes", "_tried", "rewritten", "upstream")

    def __init__(self, router: Router, request: StreamRequest, routes: tuple[Route, ...]) -> None:
        self._router = router
        self._request = request
        self._routes = routes
        self._tried: list[Upstream] = []
        #: The upstream of the latest attempt (the one that served, once it did).
        self.upstream: Upstream | None = None
        #: That attempt sent the upstream another model name (an alias).
        self.rewritten = False

    def __call__(self) -> AbstractAsyncContextManager[AsyncIterator[tuple[Event, int]]]:
        request = self._request
        route = self._router.choose(self._routes, request.model, self._tried)
        if route is None:  # every candidate was tried: a retry starts a new round
            self._tried.clear()
            route = self._router.choose(self._routes, request.model, self._tried)
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
        return any(upstream not in tried for upstream, _ in self._routes)


def _renamed(request: StreamRequest, model: str) -> StreamRequest:
    """A copy of ``request`` for ``model`` (an alias's name on one upstream)."""
    copy: StreamRequest = (pb.GenerateRequest() if isinstance(request, pb.GenerateRequest)
                           else pb.ChatRequest())
    copy.CopyFrom(request)  # type: ignore[arg-type]
    copy.model = model
    return copy


class Router:
    """The configured upstreams: routing, model lists, embeds, health state, reloads.

    ``single`` is the backend when the configuration is the ``--ollama-url`` shortcut
    (one upstream asked for every model): the servicer then calls it directly.
    """

    def __init__(self, config: UpstreamsConfig, factory: Factory, *,
                 failover_timeout: float = 30.0, watch: UpstreamsFile | None = None,
                 rng: random.Random | None = None) -> None:
        self._factory = factory
        self._failover_timeout = failover_timeout
        self._watch = watch
        self._rng = rng or random.Random()
        self.upstreams: list[Upstream] = []
        self._by_name: dict[str, Upstream] = {}
        self._retired: list[Upstream] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.config = config
        self._aliases: dict[str, tuple[Route, ...]] = {}
        self._exact: dict[str, tuple[Upstream, ...]] = {}
        self._patterns: list[tuple[str, Upstream]] = []
        self._cache: dict[str, tuple[Route, ...]] = {}
        self.single: Backend | None = None
        self.single_name = ""
        #: Called when an upstream's circuit opens or closes, or the upstreams changed.
        self.on_change: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._apply(config)

    @classmethod
    def of(cls, backend: Backend) -> Router:
        """One given backend, asked for every model (tests, embedding)."""
        spec = UpstreamSpec(backend.name, "ollama", backend.base_url, models=("*",))
        return cls(UpstreamsConfig((spec,)), lambda _: backend)

    # -- configuration ---------------------------------------------------------------

    def _apply(self, config: UpstreamsConfig) -> None:
        """Puts ``config`` in force: an upstream whose connection settings did not change
        keeps its backend (connections, breaker, calls in flight); a new or changed one
        gets a new backend; one that went away is retired, and closed once its calls end.
        Raises UpstreamsFileError (nothing changed) when a backend cannot be built."""
        built: dict[str, Upstream] = {}
        try:
            for spec in config.upstreams:
                old = self._by_name.get(spec.name)
                if old is not None and old.spec.connection == spec.connection:
                    continue
                built[spec.name] = Upstream(spec, self._factory(spec), self._failover_timeout)
        except UpstreamsFileError:
            for upstream in built.values():
                self._retire(upstream)
            raise
        upstreams = []
        for spec in config.upstreams:
            upstream = built.get(spec.name) or self._by_name[spec.name]
            upstream.configure(spec, self._failover_timeout)
            upstreams.append(upstream)
        kept = {spec.name for spec in config.upstreams}
        for name, old in self._by_name.items():
            if name not in kept or built.get(name, old) is not old:
                self._retire(old)
        self.upstreams = upstreams
        self._by_name = {u.name: u for u in upstreams}
        for upstream in upstreams:
            upstream.backend.breaker.on_change = self._breaker_changed
        self.config = config
        only = upstreams[0] if len(upstreams) == 1 else None
        self.single = (only.backend if only is not None and not config.aliases
                       and not config.source and only.spec.models == ("*",) else None)
        self.single_name = only.name if self.single is not None and only is not None else ""
        self._index()

    def _retire(self, upstream: Upstream) -> None:
        upstream.backend.breaker.on_change = None
        self._retired.append(upstream)

    def _breaker_changed(self, is_open: bool) -> None:
        if self.on_change is not None:
            self.on_change()

    def _index(self) -> None:
        """Rebuilds the model -> upstreams index (after a reload or a discovery)."""
        self._aliases = {
            alias: tuple((self._by_name[t.upstream], t.model) for t in targets)
            for alias, targets in self.config.aliases.items()
        }
        exact: dict[str, list[Upstream]] = {}
        patterns: list[tuple[str, Upstream]] = []
        for upstream in self.upstreams:
            names: Iterable[str] = upstream.spec.models
            if upstream.spec.discover:
                names = upstream.discovered or ()
            for name in names:
                if is_pattern(name):
                    patterns.append((name, upstream))
                    continue
                for spelling in spellings(name):
                    holders = exact.setdefault(spelling, [])
                    if upstream not in holders:
                        holders.append(upstream)
        self._exact = {name: tuple(holders) for name, holders in exact.items()}
        self._patterns = patterns
        self._cache = {}

    def upstream(self, name: str) -> Upstream:
        return self._by_name[name]

    # -- routing ---------------------------------------------------------------------

    def routes(self, model: str) -> tuple[Route, ...]:
        """The candidates for ``model``, in configuration order."""
        found = self._cache.get(model)
        if found is not None:
            return found
        found = self._aliases.get(model)
        if found is None:
            holders = list(self._exact.get(model, ()))
            for pattern, upstream in self._patterns:
                if upstream not in holders and any(
                        fnmatch.fnmatchcase(s, pattern) for s in spellings(model)):
                    holders.append(upstream)
            order = {u: i for i, u in enumerate(self.upstreams)}
            holders.sort(key=order.__getitem__)
            found = tuple((upstream, None) for upstream in holders)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[model] = found
        return found

    def call(self, request: StreamRequest) -> Call:
        """The attempts of one Generate or Chat call; raises ModelNotFound when no
        upstream serves its model."""
        routes = self.routes(request.model)
        if not routes:
            raise self._no_route(request.model)
        return Call(self, request, routes)

    def _no_route(self, model: str) -> ModelNotFound:
        return ModelNotFound(model, f"no upstream of this gateway serves model "
                                    f"'{excerpt(model, 200)}'; ListModels shows the models and "
                                    "aliases it serves")

    def choose(self, routes: tuple[Route, ...], model: str,
               tried: list[Upstream]) -> Route | None:
        """The best untried candidate (the order in the module docstring)."""
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
        point = self._rng.random() * total
        for route in ties:
            point -= route[0].weight
            if point < 0:
                return route
        return ties[-1]

    # -- unary calls -----------------------------------------------------------------

    async def embed(self, request: pb.EmbedRequest, *,
                    deadline: float | None = None) -> pb.EmbedResponse:
        """Embeds on the first healthy candidate, moving on as a stream does."""
        if self.single is not None:
            return await self.single.embed(request, deadline=deadline)
        routes = self.routes(request.model)
        if not routes:
            raise self._no_route(request.model)
        loop = asyncio.get_running_loop()
        end = None if deadline is None else loop.time() + deadline
        tried: list[Upstream] = []
        while True:
            route = self.choose(routes, request.model, tried)
            assert route is not None
            upstream, name = route
            tried.append(upstream)
            sent = request
            if name is not None and name != request.model:
                sent = pb.EmbedRequest()
                sent.CopyFrom(request)
                sent.model = name
            left = None if end is None else max(end - loop.time(), 0.0)
            upstream.in_flight += 1
            try:
                response = await upstream.backend.embed(sent, deadline=left)
            except UpstreamError as exc:
                if not moves_on(exc) or all(u in tried for u, _ in routes):
                    raise
                log.info("embed on upstream %s failed (%s); trying the next upstream",
                         upstream.name, type(exc).__name__)
                continue
            finally:
                upstream.in_flight -= 1
            if sent is not request:
                response.model = request.model
            return response

    async def models(self, *, deadline: float | None = None) -> list[pb.Model]:
        """Every upstream's models, each name once with the upstreams that serve it, and
        the aliases; an upstream that cannot list is skipped (with a warning) unless all
        fail. Most recently modified first."""
        upstreams = list(self.upstreams)
        results = await asyncio.gather(
            *(u.backend.models(deadline=deadline) for u in upstreams), return_exceptions=True)
        merged: dict[str, pb.Model] = {}
        failures: list[UpstreamError] = []
        for upstream, found in zip(upstreams, results, strict=True):
            if isinstance(found, BaseException):
                if not isinstance(found, UpstreamError):
                    raise found
                failures.append(found)
                log.warning("ListModels: upstream %s skipped: %s", upstream.name, found.message)
                continue
            for model in found:
                if not upstream.serves(model.name):
                    continue
                entry = merged.get(model.name)
                if entry is None:
                    entry = merged[model.name] = model
                if upstream.name not in entry.upstreams:
                    entry.upstreams.append(upstream.name)
        if failures and len(failures) == len(upstreams):
            raise failures[0]
        for alias, targets in self._aliases.items():
            entry = pb.Model()
            for upstream, name in targets:
                listed = merged.get(name or "") or next(
                    (merged[s] for s in spellings(name or "") if s in merged), None)
                if listed is not None and upstream.name in listed.upstreams:
                    entry.CopyFrom(listed)
                    break
            entry.name = alias
            del entry.upstreams[:]
            entry.upstreams.extend(upstream.name for upstream, _ in targets)
            merged[alias] = entry
        models = list(merged.values())
        models.sort(key=lambda m: (m.modified_at.seconds, m.modified_at.nanos), reverse=True)
        return models

    # -- health, discovery, reloads ----------------------------------------------------

    @property
    def ready(self) -> bool:
        """At least one upstream can serve."""
        return any(u.up for u in self.upstreams)

    async def probe_all(self, timeout: float) -> None:  # noqa: ASYNC109 - a probe's bound
        """Probes every upstream at once; refreshes what each has loaded."""
        await asyncio.gather(*(self._probe(u, timeout) for u in self.upstreams))

    async def _probe(self, upstream: Upstream, timeout: float) -> None:  # noqa: ASYNC109
        backend = upstream.backend
        try:
            await backend.probe(timeout=timeout)
        except UpstreamError as exc:
            if upstream.probe_ok:
                log.warning("upstream %s (%s) unreachable: %s", upstream.name,
                            backend.base_url, exc.message)
            upstream.probe_ok = False
            return
        if not upstream.probe_ok:
            log.info("upstream %s (%s) reachable again", upstream.name, backend.base_url)
        upstream.probe_ok = True
        upstream.suspect = False
        loaded_models = getattr(backend, "loaded_models", None)
        if loaded_models is not None:
            try:
                names = await loaded_models(timeout=timeout)
            except UpstreamError:
                upstream.loaded = None
            else:
                upstream.loaded = frozenset(s for n in names for s in spellings(n))

    async def discover(self, *, now: float | None = None) -> None:
        """Lists the models of each ``discover = true`` upstream whose interval passed (or
        that was never listed); a failure keeps the previous list."""
        loop = asyncio.get_running_loop()
        now = loop.time() if now is None else now
        due = [u for u in self.upstreams if u.spec.discover and now - u.discovered_at >= (
            min(u.spec.discover_interval, _RELIST) if u.listing_failed
            else u.spec.discover_interval)]
        if not due:
            return
        results = await asyncio.gather(
            *(u.backend.models(deadline=min(u.spec.discover_interval, 30.0)) for u in due),
            return_exceptions=True)
        changed = False
        for upstream, found in zip(due, results, strict=True):
            upstream.discovered_at = now
            if isinstance(found, BaseException):
                if not isinstance(found, UpstreamError):
                    raise found
                if not upstream.listing_failed:
                    log.warning("upstream %s: model list not %s (%s); retrying every %gs",
                                upstream.name, "refreshed" if upstream.discovered is not None
                                else "read, so it serves no model yet", found.message,
                                min(upstream.spec.discover_interval, _RELIST))
                upstream.listing_failed = True
                continue
            upstream.listing_failed = False
            names = frozenset(m.name for m in found)
            if names != upstream.discovered:
                upstream.discovered = names
                changed = True
        if changed:
            self._index()

    def reload(self) -> bool:
        """Puts the upstreams file's new version in force, if it changed and is good."""
        if self._watch is None:
            return False
        config = self._watch.changed()
        if config is None:
            return False
        try:
            self._apply(config)
        except UpstreamsFileError as exc:
            self._watch.rejected(exc)
            return False
        self._watch.accept(config)
        log.info("upstreams file %s reloaded: %s", config.source,
                 ", ".join(u.name for u in self.upstreams))
        if self.on_change is not None:
            self.on_change()
        return True

    def _close_retired(self) -> None:
        for upstream in [u for u in self._retired if u.in_flight == 0]:
            self._retired.remove(upstream)
            task = asyncio.get_running_loop().create_task(upstream.backend.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def maintain(self) -> None:
        """One round of upkeep: reload, discovery, closing retired backends."""
        self.reload()
        await self.discover()
        self._close_retired()

    async def _upkeep(self, period: float) -> None:
        while True:
            try:
                await self.maintain()
            except Exception:  # upkeep must go on; the next round retries
                log.exception("upstreams upkeep failed")
            await asyncio.sleep(period)

    async def start(self, period: float = 1.0) -> None:
        """Discovers models once (so that routing knows them from the first call), then
        keeps up every ``period`` seconds in the background."""
        await self.discover()
        self._task = asyncio.get_running_loop().create_task(self._upkeep(period))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for upstream in self.upstreams + self._retired:
            await upstream.backend.aclose()
        self._retired.clear()
        if self._closing:
            await asyncio.wait(list(self._closing))

