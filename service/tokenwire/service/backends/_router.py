"""Which upstream takes a call, and the next one when it fails before its first token.

Per call (``Router.call``, ``Router.embed``):

1. candidates: the upstreams that serve the model the request names. An alias lists its
   own (each with the model name that upstream receives); any other name is served by
   the upstreams whose ``models`` patterns match it, or whose discovered model list has
   it ("x" and "x:latest" are one model). The request never names an upstream: what a
   caller may reach follows from the public model name, which its policy checks.
2. among them, the one ``_choice.choose`` ranks first: healthy, in the best priority tier
   with a free slot, with the model loaded, the least loaded by slots, then by weight.

Failover: a failure before the first token after which another upstream may do better
(``moves_on``: no connection, 503, 429, a crashed runner, a 404 for the model, an
upstream that refuses the gateway, no first token within its ``failover_timeout`` while
another healthy upstream is left) sends the next attempt to the next candidate at once,
within the first-token wait and the caller's deadline. The relay makes attempts only
before the first chunk, so nothing reaches the caller twice. Once every candidate was
tried, ``--upstream-retries`` retries (with backoff) start a new round.

The router also keeps the upstreams' state: health probes (with what each has loaded),
discovered model lists, reloads of the upstreams file. The one-upstream shortcut
(``--ollama-url``) skips routing altogether: the servicer calls ``single`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import random
from collections.abc import Callable, Iterable

from tokenwire.v1 import generation_pb2 as pb

from .._exceptions import (
    ModelNotFound,
    UpstreamError,
    excerpt,
)
from ._base import Backend, StreamRequest
from ._choice import Call, Route, Upstream, choose, moves_on, reason_of, spellings
from ._upstreams import (
    UpstreamsConfig,
    UpstreamsFile,
    UpstreamsFileError,
    UpstreamSpec,
    is_pattern,
)

__all__ = ["Router"]

log = logging.getLogger("tokenwire.service")

Factory = Callable[[UpstreamSpec], Backend]
_MAX_CACHED = 4096  # model names (callers' strings) whose routes are kept
_RELIST = 5.0  # seconds between tries of a model list that failed


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
        return Call(request, routes, self._rng)

    def _no_route(self, model: str) -> ModelNotFound:
        return ModelNotFound(model, f"no upstream of this gateway serves model "
                                    f"'{excerpt(model, 200)}'; ListModels shows the models and "
                                    "aliases it serves")

    def choose(self, routes: tuple[Route, ...], model: str,
               tried: list[Upstream]) -> Route | None:
        return choose(routes, model, tried, self._rng)

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
                         upstream.name, reason_of(exc))
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
        relisted = False
        for upstream, found in zip(upstreams, results, strict=True):
            if isinstance(found, BaseException):
                if not isinstance(found, UpstreamError):
                    raise found
                failures.append(found)
                log.warning("ListModels: upstream %s skipped: %s", upstream.name, found.message)
                continue
            if upstream.spec.discover:  # a fresh list: routing takes it too
                names = frozenset(m.name for m in found)
                upstream.discovered_at = asyncio.get_running_loop().time()
                upstream.listing_failed = False
                if names != upstream.discovered:
                    upstream.discovered = names
                    relisted = True
            for model in found:
                if not upstream.serves(model.name):
                    continue
                entry = merged.get(model.name)
                if entry is None:
                    entry = merged[model.name] = model
                if upstream.name not in entry.upstreams:
                    entry.upstreams.append(upstream.name)
        if relisted:
            self._index()
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
        if loaded_models is not None and self.single is None:  # only routing asks
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

