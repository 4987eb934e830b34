"""The router, with fake backends: which upstreams serve a model (patterns, discovered
lists, aliases), the routing order (health, priority tiers, load by slots, loaded
models, weights), failover decisions, merged model lists, embeds, probes and reloads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tokenwire.service import (
    InvalidRequest,
    ModelNotFound,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamError,
)
from tokenwire.service._relay import Relay
from tokenwire.service.backends._base import Event, Final
from tokenwire.service.backends._breaker import CircuitBreaker
from tokenwire.service.backends._choice import Upstream, moves_on
from tokenwire.service.backends._router import Router
from tokenwire.service.backends._upstreams import (
    UpstreamsFile,
    UpstreamsFileError,
    UpstreamSpec,
    parse_upstreams,
)
from tokenwire.v1 import generation_pb2 as pb


class FakeBackend:
    """A backend that answers from memory; ``fail`` makes its streams raise before any
    event, ``hang`` makes them wait for ever."""

    def __init__(self, name: str, *, models: tuple[str, ...] = ()) -> None:
        self.name = name
        self.base_url = f"http://{name}.test"
        self.breaker = CircuitBreaker(threshold=1, cooldown=60.0, url=self.base_url)
        self.listed: list[str] | UpstreamError = list(models)
        self.loaded: list[str] = []
        self.down = False
        self.fail: UpstreamError | None = None
        self.hang = False
        self.asked: list[str] = []  # the model of each stream or embed it was asked for
        self.closed = False
        self.lists = 0

    def stream(self, request: pb.GenerateRequest | pb.ChatRequest) -> Any:
        self.asked.append(request.model)
        return self._stream(request.model)

    @contextlib.asynccontextmanager
    async def _stream(self, model: str) -> AsyncIterator[AsyncIterator[tuple[Event, int]]]:
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.Event().wait()

        async def events() -> AsyncIterator[tuple[Event, int]]:
            yield (self.name, "", None, None), 1
            yield ("", "", None, Final(pb.FINISH_REASON_STOP, pb.Usage(), model)), 1

        yield events()

    async def models(self, *, deadline: float | None = None) -> list[pb.Model]:
        self.lists += 1
        if isinstance(self.listed, UpstreamError):
            raise self.listed
        return [pb.Model(name=n, size_bytes=len(n), family=self.name) for n in self.listed]

    async def embed(self, request: pb.EmbedRequest, *,
                    deadline: float | None = None) -> pb.EmbedResponse:
        self.asked.append(request.model)
        if self.fail is not None:
            raise self.fail
        return pb.EmbedResponse(model=request.model, embeddings=[pb.Embedding(values=[1.0])])

    async def probe(self, *, timeout: float) -> None:  # noqa: ASYNC109
        if self.down:
            raise UpstreamConnectError(f"{self.name} is down")

    async def loaded_models(self, *, timeout: float) -> list[str]:  # noqa: ASYNC109
        return list(self.loaded)

    async def aclose(self) -> None:
        self.closed = True


def _toml(**tables: str) -> str:
    return "".join(f'[upstreams.{name}]\nkind = "ollama"\nurl = "http://{name}:1"\n{body}\n'
                   for name, body in tables.items())


def _router(text: str, *, seed: int = 7, **kwargs: Any) -> tuple[Router, dict[str, FakeBackend]]:
    config = parse_upstreams(text, "test.toml")
    fakes = {s.name: FakeBackend(s.name) for s in config.upstreams}
    router = Router(config, lambda spec: fakes[spec.name], rng=random.Random(seed), **kwargs)
    return router, fakes


def _pick(router: Router, model: str, tried: list[Upstream] | None = None) -> str:
    route = router.choose(router.routes(model), model, tried or [])
    assert route is not None
    return route[0].name


# -- which upstreams serve a model ---------------------------------------------------------


async def test_patterns_discovered_lists_and_spellings_decide_the_candidates() -> None:
    router, fakes = _router(_toml(gpu1='models = ["smollm2:*", "llama3.2"]',
                                  gpu2="discover = true", hosted='models = ["gpt-4o*"]'))
    fakes["gpu2"].listed = ["tiny:latest", "smollm2:135m"]
    assert [u.name for u, _ in router.routes("tiny")] == []  # not listed yet
    await router.discover()
    assert [u.name for u, _ in router.routes("smollm2:135m")] == ["gpu1", "gpu2"]
    assert [u.name for u, _ in router.routes("tiny")] == ["gpu2"]  # tiny is tiny:latest
    assert [u.name for u, _ in router.routes("tiny:latest")] == ["gpu2"]
    assert [u.name for u, _ in router.routes("llama3.2:latest")] == ["gpu1"]
    assert [u.name for u, _ in router.routes("gpt-4o-mini")] == ["hosted"]
    assert router.routes("mistral") == ()
    with pytest.raises(ModelNotFound, match="no upstream of this gateway serves model "
                                            "'mistral'"):
        router.call(pb.GenerateRequest(model="mistral"))


async def test_an_alias_names_its_upstreams_and_each_one_gets_its_own_model_name() -> None:
    router, fakes = _router(
        _toml(gpu1='models = ["smollm2:*"]', hosted='models = ["gpt-*"]', other='models=["*"]')
        + '[aliases]\n"chat-small" = [{upstream = "hosted", model = "gpt-4o-mini"}, '
          '{upstream = "gpu1", model = "smollm2:135m"}]\n')
    routes = router.routes("chat-small")
    # the alias's upstreams only (not "other", whose "*" would match), in the alias's order
    assert [(u.name, m) for u, m in routes] == [("hosted", "gpt-4o-mini"),
                                                ("gpu1", "smollm2:135m")]
    request = pb.GenerateRequest(model="chat-small", prompt="p")
    call = router.call(request)
    async with call() as events:
        assert [e async for e in events]
    first = call.upstream_name
    assert fakes[first].asked == ["gpt-4o-mini" if first == "hosted" else "smollm2:135m"]
    assert call.rewritten and request.model == "chat-small"  # the caller's request unchanged


# -- the routing order ---------------------------------------------------------------------


async def test_the_best_priority_tier_first_then_the_next_tier_when_it_is_full_or_down(
        ) -> None:
    router, fakes = _router(_toml(local='models = ["m"]\nslots = 2',
                                  hosted='models = ["m"]\npriority = 10\nslots = 8'))
    local = router.upstream("local")
    assert _pick(router, "m") == "local"
    local.in_flight = 1
    assert _pick(router, "m") == "local"  # a free slot left in the preferred tier
    local.in_flight = 2
    assert _pick(router, "m") == "hosted"  # the preferred tier is full: spill over
    router.upstream("hosted").in_flight = 8
    assert _pick(router, "m") == "local"  # every tier full: the preferred one (it queues)
    local.in_flight = 0
    router.upstream("hosted").in_flight = 0
    fakes["local"].down = True
    await router.probe_all(1.0)
    assert _pick(router, "m") == "hosted"  # down: not a candidate while another is healthy


async def test_the_least_loaded_relative_to_its_slots() -> None:
    router, _ = _router(_toml(big='models = ["m"]\nslots = 4', small='models = ["m"]'))
    big, small = router.upstream("big"), router.upstream("small")
    big.in_flight, small.in_flight = 2, 0  # 0.5 against 0.0
    assert _pick(router, "m") == "small"
    big.in_flight, small.in_flight = 1, 1  # 0.25 against full
    assert _pick(router, "m") == "big"
    big.in_flight, small.in_flight = 5, 1  # both full: 1.25 against 1.0
    assert _pick(router, "m") == "small"


async def test_an_upstream_with_the_model_loaded_is_preferred_while_it_has_a_free_slot() -> None:
    router, fakes = _router(_toml(warm='models = ["m*"]\nslots = 4',
                                  cold='models = ["m*"]\nslots = 4'))
    fakes["warm"].loaded = ["m:latest"]
    fakes["cold"].loaded = ["other:7b"]
    await router.probe_all(1.0)
    warm = router.upstream("warm")
    warm.in_flight = 3  # busier, but it has the model in memory and a free slot
    assert _pick(router, "m") == "warm"  # "m" is "m:latest"
    assert _pick(router, "m2") == "cold"  # loaded nowhere: the least loaded
    warm.in_flight = 4  # full: the least loaded wins, loaded or not
    assert _pick(router, "m") == "cold"


async def test_weights_share_the_calls_among_equals() -> None:
    router, _ = _router(_toml(a='models = ["m"]\nweight = 3', b='models = ["m"]'), seed=1)
    picks = Counter(_pick(router, "m") for _ in range(4000))
    assert 2850 <= picks["a"] <= 3150, picks  # 3:1, within about 5 standard deviations
    router.upstream("a").in_flight = 1  # no longer equal: the idle one, whatever the weight
    assert {_pick(router, "m") for _ in range(50)} == {"b"}


async def test_unhealthy_upstreams_are_passed_over_and_tried_last() -> None:
    router, fakes = _router(_toml(a='models = ["m"]\nweight = 1000', b='models = ["m"]'))
    a = router.upstream("a")
    fakes["a"].breaker.failure()  # threshold 1: open
    assert _pick(router, "m") == "b"
    fakes["a"].breaker.success()
    a.suspect = True  # ran out of its first-token limit
    assert _pick(router, "m") == "b"
    await router.probe_all(1.0)  # a good probe clears it
    assert not a.suspect
    fakes["b"].down = True
    fakes["a"].down = True
    await router.probe_all(1.0)
    assert not router.ready
    # none is healthy: still a choice (the engine's own error, or a recovered upstream)
    assert _pick(router, "m") in {"a", "b"}
    assert _pick(router, "m", [router.upstream("a")]) == "b"
    assert router.choose(router.routes("m"), "m", [a, router.upstream("b")]) is None


# -- attempts and failover -----------------------------------------------------------------


def test_which_failures_move_a_call_to_another_upstream() -> None:
    assert moves_on(UpstreamConnectError("refused"))
    assert moves_on(UpstreamBusy("503"))
    assert moves_on(UpstreamBusy("429", outage=False))
    assert moves_on(ModelNotFound("m", "404"))
    assert not moves_on(InvalidRequest("bad option"))
    assert not moves_on(UpstreamError("500 from a live engine"))


async def test_each_attempt_goes_to_the_next_candidate_and_counts_as_in_flight() -> None:
    router, fakes = _router(_toml(a='models = ["m"]\nweight = 1000', b='models = ["m"]',
                                  c='models = ["m"]'), failover_timeout=7.0)
    call = router.call(pb.GenerateRequest(model="m"))
    seen = []
    for _ in range(3):
        opened = call()
        assert call.attempt_limit() == (7.0 if len(seen) < 2 else None)  # the last: no limit
        async with opened:
            seen.append(call.upstream_name)
            assert router.upstream(call.upstream_name).in_flight == 1
        assert router.upstream(call.upstream_name).in_flight == 0
        assert call.failed(UpstreamConnectError("x")) is (len(seen) < 3)
    assert sorted(seen) == ["a", "b", "c"] and seen[0] == "a"
    assert not call.failed(InvalidRequest("x"))
    call()  # every candidate tried: a retry starts a new round
    assert call.upstream_name == "a"


async def _relay_answer(router: Router, request: pb.GenerateRequest,
                        **kwargs: Any) -> tuple[list[str], Relay]:
    call = router.call(request)
    relay = Relay(call, first_token_timeout=10.0, idle_timeout=10.0, failover=call, **kwargs)
    texts = []
    try:
        while batch := await relay.take():
            texts += [event[0] for event in batch]
            if batch[-1][3] is not None:
                break
    finally:
        await relay.aclose()
    return texts, relay


async def test_the_relay_moves_a_failed_attempt_to_the_next_upstream_at_once() -> None:
    router, fakes = _router(_toml(a='models = ["m"]\nweight = 1000', b='models = ["m"]'))
    fakes["a"].fail = UpstreamConnectError("refused")
    texts, relay = await _relay_answer(router, pb.GenerateRequest(model="m"),
                                       retry_backoff=30.0)  # a retry would wait: none does
    assert texts == ["b", ""] and relay.attempts == 2
    assert fakes["a"].asked == ["m"] and fakes["b"].asked == ["m"]


async def test_a_request_error_is_not_failed_over() -> None:
    router, fakes = _router(_toml(a='models = ["m"]\nweight = 1000', b='models = ["m"]'))
    fakes["a"].fail = InvalidRequest("bad option")
    with pytest.raises(InvalidRequest):
        await _relay_answer(router, pb.GenerateRequest(model="m"))
    assert fakes["b"].asked == []


async def test_a_hung_upstream_gets_its_failover_timeout_then_the_call_moves_on() -> None:
    router, fakes = _router(_toml(a='models = ["m"]\nweight = 1000\nfailover_timeout = 0.2',
                                  b='models = ["m"]'))
    fakes["a"].hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    texts, relay = await _relay_answer(router, pb.GenerateRequest(model="m"))
    assert texts == ["b", ""] and relay.attempts == 2
    assert 0.2 <= loop.time() - started < 2.0
    assert router.upstream("a").suspect  # passed over until its next good probe
    assert _pick(router, "m") == "b"


async def test_the_last_candidate_gets_the_whole_first_token_wait() -> None:
    router, fakes = _router(_toml(a='models = ["m"]\nfailover_timeout = 0.05'))
    fakes["a"].hang = True
    call = router.call(pb.GenerateRequest(model="m"))
    relay = Relay(call, first_token_timeout=0.5, idle_timeout=10.0, failover=call)
    with pytest.raises(UpstreamError, match="no output from Ollama within 0.5s"):
        await relay.take()
    await relay.aclose()
    assert relay.attempts == 1


# -- models, embeds ------------------------------------------------------------------------


async def test_model_lists_are_merged_with_their_upstreams_and_aliases() -> None:
    router, fakes = _router(
        _toml(gpu1="discover = true", gpu2='models = ["smollm2:*"]', down='models = ["*"]')
        + '[aliases]\n"chat" = [{upstream = "gpu2", model = "smollm2:135m"}, '
          '{upstream = "down", model = "big"}]\n')
    fakes["gpu1"].listed = ["smollm2:135m", "tiny:latest"]
    fakes["gpu2"].listed = ["smollm2:135m", "qwen:0.5b"]  # qwen: not among its models
    fakes["down"].listed = UpstreamConnectError("refused")
    await router.discover()
    models = {m.name: m for m in await router.models()}
    assert set(models) == {"smollm2:135m", "tiny:latest", "chat"}
    assert list(models["smollm2:135m"].upstreams) == ["gpu1", "gpu2"]
    assert list(models["tiny:latest"].upstreams) == ["gpu1"]
    assert list(models["chat"].upstreams) == ["gpu2", "down"]
    assert models["chat"].size_bytes == len("smollm2:135m")  # the details of the model it names
    for fake in fakes.values():
        fake.listed = UpstreamConnectError("refused")
    with pytest.raises(UpstreamConnectError):
        await router.models()


async def test_embed_moves_on_as_a_stream_does() -> None:
    router, fakes = _router(
        _toml(a='models = ["e"]\nweight = 1000', b='models = ["e"]')
        + '[aliases]\n"vec" = [{upstream = "a", model = "e"}, {upstream = "b", model = "e2"}]\n')
    fakes["a"].fail = UpstreamBusy("503")
    response = await router.embed(pb.EmbedRequest(model="vec", inputs=["x"]))
    assert response.model == "vec"  # as the request named it
    assert fakes["a"].asked == ["e"] and fakes["b"].asked == ["e2"]
    assert router.upstream("a").in_flight == router.upstream("b").in_flight == 0
    fakes["b"].fail = UpstreamBusy("503")
    with pytest.raises(UpstreamBusy):
        await router.embed(pb.EmbedRequest(model="e", inputs=["x"]))


# -- probes, discovery, reloads ------------------------------------------------------------


async def test_a_failed_model_list_keeps_the_previous_one_until_the_next_interval() -> None:
    router, fakes = _router(_toml(a="discover = true\ndiscover_interval = 60"))
    fakes["a"].listed = ["m:latest"]
    await router.discover(now=0.0)
    fakes["a"].listed = UpstreamConnectError("refused")
    await router.discover(now=30.0)  # not due
    assert fakes["a"].lists == 1
    await router.discover(now=61.0)
    assert fakes["a"].lists == 2 and [u.name for u, _ in router.routes("m")] == ["a"]
    fakes["a"].listed = ["n:latest"]
    await router.discover(now=63.0)  # failed last time: tried again sooner
    assert fakes["a"].lists == 2
    await router.discover(now=66.5)
    assert router.routes("m") == () and [u.name for u, _ in router.routes("n")] == ["a"]


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


async def test_a_reload_keeps_unchanged_upstreams_and_retires_the_others(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(_toml(a='models = ["m"]', b='models = ["m"]'))
    built: list[FakeBackend] = []

    def factory(spec: UpstreamSpec) -> FakeBackend:
        if spec.url == "http://broken:1":
            raise UpstreamsFileError(f"{spec.where} kind: cannot build")
        built.append(FakeBackend(spec.name))
        return built[-1]

    watch = UpstreamsFile(str(path))
    router = Router(watch.config, factory, watch=watch)
    changes = []
    router.on_change = lambda: changes.append(1)
    a, b = router.upstream("a"), router.upstream("b")
    b.in_flight = 1  # a call still running on b

    # a: new slots (kept); b: new URL (new backend); c: new
    _write(path, _toml(a='models = ["m"]\nslots = 3', c='models = ["m"]')
           + '[upstreams.b]\nkind = "ollama"\nurl = "http://elsewhere:1"\nmodels = ["m"]\n')
    assert router.reload() and changes == [1]
    assert router.upstream("a") is a and a.slots == 3
    assert router.upstream("b") is not b and router.upstream("b").backend.base_url.startswith(
        "http://b")
    assert [u.name for u in router.upstreams] == ["a", "c", "b"]
    await router.maintain()
    assert not b.backend.closed  # its call still runs  # type: ignore[attr-defined]
    b.in_flight = 0
    await router.maintain()
    await asyncio.sleep(0)
    assert b.backend.closed  # type: ignore[attr-defined]

    # a backend that cannot be built: nothing changes
    _write(path, _toml(a='models = ["m"]') + '[upstreams.d]\nkind = "ollama"\n'
           'url = "http://broken:1"\nmodels = ["m"]\n')
    assert not router.reload()
    assert [u.name for u in router.upstreams] == ["a", "c", "b"]
    await router.aclose()
    assert all(fake.closed for fake in built)


async def test_list_models_refreshes_a_discovered_list_for_routing() -> None:
    router, fakes = _router(_toml(a="discover = true\ndiscover_interval = 3600"))
    fakes["a"].listed = ["m:latest"]
    await router.discover()
    fakes["a"].listed = ["m:latest", "pulled:latest"]  # pulled since
    assert router.routes("pulled") == ()
    assert {m.name for m in await router.models()} == {"m:latest", "pulled:latest"}
    assert [u.name for u, _ in router.routes("pulled")] == ["a"]
