"""Several upstreams (``--upstreams-file``) against several test Ollamas on their own
ports: routing by model and by load, aliases, failover before the first token (refused,
503, 429, a crashed runner, hung), no failover after it, merged model lists, readiness,
the per-upstream metric, reloads, and what the server process prints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import FAST, runtimes
from tests.fakeollama import DEFAULT_TOKENS, FakeOllama, Fault
from tests.helpers import joined, reason, samples, scrape, server_process, value
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

ANSWER = "".join(DEFAULT_TOKENS)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _table(name: str, url: str, body: str) -> str:
    return f'[upstreams.{name}]\nkind = "ollama"\nurl = "{url}"\n{body}\n\n'


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000_000  # an editor saving a second later
    os.utime(path, ns=(stamp, stamp))
    return path


@pytest.fixture
async def gpu1() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=("tiny:latest", "only-one:latest", "embedder:latest")) as f:
        yield f


@pytest.fixture
async def gpu2() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=("tiny:latest", "embedder:latest")) as f:
        yield f


@contextlib.asynccontextmanager
async def gateway(path: Path, **overrides: Any) -> AsyncIterator[tuple[Runtime,
                                                                      GenerationServiceStub]]:
    async with runtimes(replace(FAST, upstreams_file=str(path), **overrides)) as make:
        runtime = await make()
        async with grpc.aio.insecure_channel(runtime.target) as channel:
            yield runtime, GenerationServiceStub(channel)


def _preferring_gpu1(tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama,
                     extra: str = "") -> Path:
    """gpu1 is the preferred tier, gpu2 the fallback: a call tries gpu1 first."""
    return _write(tmp_path / "upstreams.toml",
                  _table("gpu1", gpu1.url, 'models = ["*"]\nfailover_timeout = 0.5' + extra)
                  + _table("gpu2", gpu2.url, 'models = ["*"]\npriority = 1'))


async def _generate(stub: GenerationServiceStub, model: str = "tiny",
                    **fields: Any) -> list[pb.Token]:
    return [t async for t in stub.Generate(pb.GenerateRequest(model=model, prompt="p",
                                                              **fields), timeout=20)]


def _generations(fake: FakeOllama) -> int:
    return sum(1 for r in fake.requests if r.path == "/api/generate")


# -- routing ---------------------------------------------------------------------------------


async def test_a_model_goes_only_to_the_upstreams_that_serve_it(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    path = _write(tmp_path / "upstreams.toml",
                  _table("gpu1", gpu1.url, "discover = true")
                  + _table("gpu2", gpu2.url, 'models = ["tiny"]'))
    async with gateway(path) as (_, stub):
        for _ in range(4):  # gpu2 lacks only-one: never asked, whatever the load
            tokens = await _generate(stub, "only-one")
            assert joined(tokens) == ANSWER
            assert (tokens[-1].usage.upstream, tokens[-1].usage.attempts) == ("gpu1", 1)
        assert _generations(gpu2) == 0
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await _generate(stub, "absent")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason(missing.value) == "MODEL_NOT_FOUND"
        assert "no upstream of this gateway serves model 'absent'" in (
            missing.value.details() or "")
        assert _generations(gpu1) == 4 and _generations(gpu2) == 0


async def test_an_alias_sends_each_upstream_its_own_model_name(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    path = _write(tmp_path / "upstreams.toml",
                  _table("gpu1", gpu1.url, 'models = ["tiny"]\nslots = 1')
                  + _table("gpu2", gpu2.url, 'models = ["tiny"]\nslots = 1')
                  + '[aliases]\n"chat-small" = [{upstream = "gpu1", model = "only-one"},'
                    ' {upstream = "gpu2", model = "tiny"}]\n')
    gpu1.token_delay = gpu2.token_delay = 0.05
    async with gateway(path) as (_, stub):
        answers = await asyncio.gather(*(_generate(stub, "chat-small") for _ in range(2)))
    assert sorted(a[-1].usage.upstream for a in answers) == ["gpu1", "gpu2"]
    assert all(a[-1].model == "chat-small" for a in answers)  # as the request named it
    assert [r.body["model"] for r in gpu1.requests if r.path == "/api/generate"] == ["only-one"]
    assert [r.body["model"] for r in gpu2.requests if r.path == "/api/generate"] == ["tiny"]


async def test_concurrent_streams_spread_by_load_relative_to_slots(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    async with FakeOllama(models=("tiny:latest",)) as big:
        path = _write(tmp_path / "upstreams.toml",
                      _table("gpu1", gpu1.url, 'models = ["tiny"]\nslots = 1')
                      + _table("gpu2", gpu2.url, 'models = ["tiny"]\nslots = 1')
                      + _table("big", big.url, 'models = ["tiny"]\nslots = 2'))
        for fake in (gpu1, gpu2, big):
            fake.token_delay = 0.05  # 12 tokens: the calls overlap
        async with gateway(path) as (_, stub):
            answers = await asyncio.gather(*(_generate(stub) for _ in range(8)))
        assert all(joined(a) == ANSWER for a in answers)
        spread = Counter(a[-1].usage.upstream for a in answers)
        # 8 calls over 4 slots: every slot twice, so twice as many for the two-slot upstream
        assert spread == {"big": 4, "gpu1": 2, "gpu2": 2}, spread
        assert (gpu1.max_active_streams, gpu2.max_active_streams, big.max_active_streams) == (
            2, 2, 4)


async def test_an_upstream_with_the_model_loaded_is_preferred(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    path = _write(tmp_path / "upstreams.toml",
                  _table("gpu1", gpu1.url, 'models = ["*"]\nslots = 4')
                  + _table("gpu2", gpu2.url, 'models = ["*"]\nslots = 4'))
    gpu2.loaded = ["tiny:latest"]  # /api/ps of gpu2 shows it; gpu1 has nothing loaded
    async with gateway(path) as (runtime, stub):
        assert runtime.router.upstream("gpu2").loaded is not None
        upstreams = {(await _generate(stub))[-1].usage.upstream for _ in range(6)}
    assert upstreams == {"gpu2"}


# -- failover before the first token ----------------------------------------------------------


async def test_an_upstream_that_refuses_connections_fails_over_before_the_first_token(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama,
        caplog: pytest.LogCaptureFixture) -> None:
    # Probes far apart: gpu1 goes down after the last one said it was up.
    async with gateway(_preferring_gpu1(tmp_path, gpu1, gpu2), health_interval=60.0) as (
            runtime, stub):
        assert (await _generate(stub))[-1].usage.upstream == "gpu1"
        await gpu1.go_down()
        with caplog.at_level(logging.INFO, "tokenwire.service"):
            tokens = await _generate(stub)
    assert ("upstream gpu1 failed before the first token (UPSTREAM_UNREACHABLE); 1 other "
            "upstream(s) left for this call") in caplog.text
    assert joined(tokens) == ANSWER  # one answer: nothing twice
    assert sum(t.chunk_count for t in tokens) == gpu2.streams[-1].chunks_sent  # each once
    assert (tokens[-1].usage.upstream, tokens[-1].usage.attempts) == ("gpu2", 2)
    assert _generations(gpu2) == 1


@pytest.mark.parametrize(("fault", "what"), [
    (Fault(status=503, message="server busy, please try again.", times=1), "busy"),
    (Fault(status=429, message="too many requests", times=1), "rate limiting"),
    (Fault(status=500, message="llama runner process has terminated: exit status 2", times=1),
     "crashed runner"),
    (Fault(status=404, message="model 'tiny' not found", times=1), "model missing"),
])
async def test_busy_rate_limited_crashed_or_missing_fails_over(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama, fault: Fault, what: str) -> None:
    async with gateway(_preferring_gpu1(tmp_path, gpu1, gpu2)) as (_, stub):
        gpu1.set_fault(fault)
        tokens = await _generate(stub)
        assert joined(tokens) == ANSWER, what
        assert (tokens[-1].usage.upstream, tokens[-1].usage.attempts) == ("gpu2", 2)
        tokens = await _generate(stub)  # the fault was once: gpu1 again
        assert (tokens[-1].usage.upstream, tokens[-1].usage.attempts) == ("gpu1", 1)


async def test_a_request_error_is_not_tried_elsewhere(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    async with gateway(_preferring_gpu1(tmp_path, gpu1, gpu2)) as (_, stub):
        gpu1.set_fault(Fault(status=400, message="invalid options", times=1))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _generate(stub)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _generations(gpu2) == 0


async def test_a_mid_stream_drop_ends_the_call_with_its_tokens_and_no_failover(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    async with gateway(_preferring_gpu1(tmp_path, gpu1, gpu2)) as (_, stub):
        gpu1.set_fault(Fault(drop_after=3, times=1))
        received: list[pb.Token] = []
        with pytest.raises(grpc.aio.AioRpcError) as dropped:
            async for token in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                                             timeout=20):
                received.append(token)
    assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(dropped.value) == "UPSTREAM_DISCONNECTED"
    assert joined(received) == "".join(DEFAULT_TOKENS[:3])  # kept, not sent again
    assert _generations(gpu2) == 0


async def test_a_hung_upstream_gets_its_failover_timeout_then_the_call_moves_on(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    async with gateway(_preferring_gpu1(tmp_path, gpu1, gpu2), health_interval=60.0) as (
            runtime, stub):
        # gpu1 hangs after its last good probe: its port still accepts (the kernel does
        # that), and nothing ever answers, as with a stopped process.
        port = gpu1.port
        await gpu1.go_down()
        with socket.socket() as hung:
            hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hung.bind(("127.0.0.1", port))
            hung.listen(16)
            loop = asyncio.get_running_loop()
            started = loop.time()
            tokens = await _generate(stub)
            took = loop.time() - started
            assert joined(tokens) == ANSWER
            assert (tokens[-1].usage.upstream, tokens[-1].usage.attempts) == ("gpu2", 2)
            assert 0.5 <= took < 5.0, took  # gpu1's failover_timeout, then gpu2 at once
            # passed over until a probe answers: the next call goes straight to gpu2
            again = await _generate(stub)
            assert (again[-1].usage.upstream, again[-1].usage.attempts) == ("gpu2", 1)
            assert runtime.router.upstream("gpu1").suspect


async def test_the_last_candidate_gets_the_whole_first_token_wait(
        tmp_path: Path, gpu1: FakeOllama) -> None:
    path = _write(tmp_path / "upstreams.toml",
                  _table("gpu1", gpu1.url, 'models = ["*"]\nfailover_timeout = 0.2'))
    async with gateway(path) as (_, stub):
        gpu1.set_fault(Fault(delay_first=0.6, times=1))  # slower than its failover_timeout
        tokens = await _generate(stub)
    assert joined(tokens) == ANSWER and tokens[-1].usage.attempts == 1


# -- unary calls ---------------------------------------------------------------------------------


async def test_list_models_merges_the_upstreams_and_skips_one_that_cannot_list(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    path = _write(tmp_path / "upstreams.toml",
                  _table("gpu1", gpu1.url, "discover = true")
                  + _table("gpu2", gpu2.url, 'models = ["tiny"]')
                  + '[aliases]\n"chat-small" = [{upstream = "gpu2", model = "tiny"}, '
                    '{upstream = "gpu1", model = "only-one"}]\n')
    async with gateway(path, health_interval=60.0) as (_, stub):
        listed = {m.name: list(m.upstreams) for m in (
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models}
        assert listed == {"tiny:latest": ["gpu1", "gpu2"], "only-one:latest": ["gpu1"],
                          "embedder:latest": ["gpu1"], "chat-small": ["gpu2", "gpu1"]}
        await gpu2.go_down()
        listed = {m.name: list(m.upstreams) for m in (
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models}
        assert listed["tiny:latest"] == ["gpu1"] and "chat-small" in listed
        await gpu1.go_down()
        with pytest.raises(grpc.aio.AioRpcError) as none:
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert none.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_embed_fails_over_like_a_stream(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    async with gateway(_preferring_gpu1(tmp_path, gpu1, gpu2)) as (_, stub):
        gpu1.set_fault(Fault(status=503, times=1, paths=("/api/embed",)))
        response = await stub.Embed(pb.EmbedRequest(model="embedder", inputs=["a", "b"]),
                                    timeout=10)
    assert len(response.embeddings) == 2
    assert [r.path for r in gpu2.requests].count("/api/embed") == 1


# -- health and metrics ------------------------------------------------------------------------


async def test_readiness_is_not_serving_only_when_every_upstream_is_down_and_each_has_a_metric(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    path = _preferring_gpu1(tmp_path, gpu1, gpu2)
    async with gateway(path, health_interval=60.0, metrics_listen="127.0.0.1:0") as (
            runtime, _), grpc.aio.insecure_channel(runtime.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert runtime.metrics_port is not None

        async def state() -> tuple[int, float, float]:
            await runtime.health.check_once()
            status = (await health.Check(health_pb2.HealthCheckRequest(
                service="readiness"))).status
            found = samples((await scrape(runtime.metrics_port or 0)).text)
            return (status, value(found, "tokenwire_upstream_up", upstream="gpu1"),
                    value(found, "tokenwire_upstream_up", upstream="gpu2"))

        assert await state() == (SERVING, 1, 1)
        await gpu1.go_down()
        assert await state() == (SERVING, 0, 1)  # gpu2 can still serve
        await gpu2.go_down()
        assert await state() == (NOT_SERVING, 0, 0)
        await gpu2.come_up()
        assert await state() == (SERVING, 0, 1)
        text = (await scrape(runtime.metrics_port)).text
        assert "tiny" not in text  # model names are never labels


async def test_the_file_is_reloaded_and_a_bad_version_is_not_applied(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    path = _write(tmp_path / "upstreams.toml", _table("gpu1", gpu1.url, 'models = ["tiny"]'))
    async with gateway(path) as (runtime, stub):
        with pytest.raises(grpc.aio.AioRpcError):
            await _generate(stub, "only-one")
        # The background upkeep looks once a second; this test does its round itself.
        _write(path, _table("gpu1", gpu1.url, 'models = ["tiny"]')
               + _table("gpu2", gpu1.url, 'models = ["only-one"]'))
        await runtime.router.maintain()
        assert (await _generate(stub, "only-one"))[-1].usage.upstream == "gpu2"
        _write(path, _table("gpu1", gpu1.url, 'models = ["tiny"]\nslots = 0'))
        await runtime.router.maintain()
        assert (await _generate(stub, "only-one"))[-1].usage.upstream == "gpu2"  # kept


async def test_a_callers_policy_is_by_public_model_name(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    path = _write(tmp_path / "upstreams.toml",
                  _table("gpu1", gpu1.url, 'models = ["*"]')
                  + '[aliases]\n"chat-small" = [{upstream = "gpu1", model = "tiny"}]\n')
    callers = tmp_path / "callers.toml"
    callers.write_text('[callers.app]\ntoken = "t-app"\nmodels = ["chat-small"]\n')
    metadata = (("authorization", "Bearer t-app"),)
    async with gateway(path, callers_file=str(callers)) as (_, stub):
        tokens = [t async for t in stub.Generate(pb.GenerateRequest(
            model="chat-small", prompt="p"), metadata=metadata, timeout=10)]
        assert tokens[-1].usage.upstream == "gpu1"
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            _ = [t async for t in stub.Generate(pb.GenerateRequest(model="tiny", prompt="p"),
                                                metadata=metadata, timeout=10)]
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- the server process -----------------------------------------------------------------------


async def test_the_printed_configuration_shows_the_upstreams_and_never_a_key(
        tmp_path: Path, gpu1: FakeOllama, gpu2: FakeOllama) -> None:
    url2 = gpu2.url.replace("http://", "http://ops:pa55word@")
    path = _write(tmp_path / "upstreams.toml",
                  _table("gpu1", gpu1.url, "discover = true\nslots = 2")
                  + _table("gpu2", url2, 'models = ["tiny", "smollm2:*"]\npriority = 10'))
    async with server_process("", "--upstreams-file", str(path)) as server:
        await server.wait_for("listening on")
        printed = server.output
    assert f"upstreams from {path}:" in printed
    assert f"gpu1: ollama {gpu1.url} models=[discover (every 60s)] slots=2" in printed
    assert "gpu2: ollama http://ops:***@127.0.0.1:" in printed
    assert "models=[tiny, smollm2:*] slots=1 weight=1 priority=10" in printed
    assert "pa55word" not in printed
    assert "(2 upstreams: reachable)" in printed


async def test_a_bad_file_or_a_missing_key_stops_the_server_with_the_reason(
        tmp_path: Path, gpu1: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _write(tmp_path / "bad.toml", _table("gpu1", gpu1.url, 'models = ["tiny"]\nslots = 0'))
    async with server_process("", "--upstreams-file", str(bad), ready=False) as server:
        assert await server.exited() == 2
    assert f"{bad}: [upstreams.gpu1] slots: must be a whole number >= 1" in server.output
    hosted = _write(tmp_path / "hosted.toml",
                    '[upstreams.hosted]\nkind = "openai"\nurl = "https://api.example/v1"\n'
                    'api_key_env = "TW_E2E_KEY"\nmodels = ["gpt-*"]\n')
    async with server_process("", "--upstreams-file", str(hosted),
                              TW_E2E_KEY="sk-e2e-secret") as server:
        assert server.target  # an openai upstream that cannot be reached yet: it serves
    assert "hosted: openai https://api.example/v1" in server.output
    assert "key=env TW_E2E_KEY" in server.output and "sk-e2e-secret" not in server.output
    async with server_process("", "--upstreams-file", str(hosted), ready=False) as server:
        assert await server.exited() == 1  # the key's variable is not set: the reason, named
    assert "api_key_env: the environment variable TW_E2E_KEY is not set" in server.output
