"""The shared limits' own Redis connection (guard/_resp.py) against a real redis-server:
pipelined replies in order, scripts reloaded after NOSCRIPT, a restart, a stall past the
timeout, refused connections, error replies, AUTH and SELECT; and the limits' gate
when Redis stalls (never a hang)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hiredis import pack_command

from tests.parts import RedisServer, _free_port, redis_server
from tests.reliability.pki import Pki
from tokenwire.service.guard._admission import Admission
from tokenwire.service.guard._budget import Budget
from tokenwire.service.guard._gate import Gate, LimitsUnavailable
from tokenwire.service.guard._resp import Link, Script, Unreachable
from tokenwire.service.guard._shared import SharedLimits
from tokenwire.v1 import generation_pb2 as pb

COUNT = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
async def link(redis: RedisServer) -> AsyncIterator[Link]:
    one = Link(redis.url)
    yield one
    await one.aclose()


async def test_the_commands_of_one_turn_are_answered_in_order(link: Link) -> None:
    writes: list[int] = []
    futures = [link.send(pack_command(("INCR", "n"))) for _ in range(50)]
    assert await asyncio.gather(*futures) == list(range(1, 51))
    protocol = link._protocol
    assert protocol is not None and protocol.transport is not None
    real = protocol.transport.write
    protocol.transport.write = lambda data: (writes.append(len(data)), real(data))  # type: ignore[method-assign]
    replies = await asyncio.gather(*(link.call("INCRBY", "n", i) for i in range(1, 11)),
                                   link.call("GET", "n"))
    assert replies == [50 + i * (i + 1) // 2 for i in range(1, 11)] + [b"105"]
    assert len(writes) == 1  # eleven commands, one write


async def test_a_post_waits_for_the_next_send_and_goes_before_it(link: Link) -> None:
    assert await link.call("PING") == b"PONG"
    protocol = link._protocol
    assert protocol is not None and protocol.transport is not None
    writes: list[bytes] = []
    written = asyncio.Event()
    real = protocol.transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        written.set()
        real(data)

    protocol.transport.write = write  # type: ignore[method-assign]
    link.post(pack_command(("SET", "p", "first")))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not writes  # waiting for a send (or its delay)
    assert await link.call("GET", "p") == b"first"
    assert len(writes) == 1  # the post went first, in the same write
    written.clear()
    link.post(pack_command(("SET", "p", "second")))
    await asyncio.wait_for(written.wait(), 0.5)  # alone, it is written after its delay
    assert len(writes) == 2
    assert await link.call("GET", "p") == b"second"


async def test_a_script_redis_lost_is_loaded_again_in_order(link: Link) -> None:
    assert await link.evalsha(COUNT, ["k"], [1]) == 1
    assert await link.call("SCRIPT", "FLUSH") == b"OK"
    assert await link.call("SCRIPT", "EXISTS", COUNT.sha) == [0]
    # Several in one write all find it missing; each is run again after loading it.
    futures = [link.evalsha(COUNT, ["k"], [10]) for _ in range(5)]
    after = link.send(pack_command(("GET", "k")))
    assert sorted(await asyncio.gather(*futures)) == [11, 21, 31, 41, 51]
    assert await after == b"1"  # written before the reloads: it ran before them
    assert await link.call("GET", "k") == b"51"
    assert await link.call("SCRIPT", "EXISTS", COUNT.sha) == [1]


async def test_a_restarted_redis_is_reconnected_and_scripts_loaded_again(
        redis: RedisServer, link: Link) -> None:
    assert await link.evalsha(COUNT, ["k"], [2]) == 2
    await redis.stop()
    started = time.monotonic()
    with pytest.raises(Unreachable):
        await link.evalsha(COUNT, ["k"], [2])
    with pytest.raises(Unreachable, match="cannot connect"):
        await link.call("PING")
    assert time.monotonic() - started < 0.5  # refused: no wait for the timeout
    await redis.start()  # empty: no data, no scripts
    assert await link.evalsha(COUNT, ["k"], [3]) == 3


async def test_a_stalled_redis_fails_the_waiting_commands_after_the_timeout(
        redis: RedisServer, link: Link) -> None:
    dropped: list[str] = []
    link.on_dropped = dropped.append
    assert await link.call("PING") == b"PONG"
    other = Link(redis.url)
    try:
        assert await other.call("CLIENT", "PAUSE", 1500, "ALL") == b"OK"
        started = time.monotonic()
        waiting = [link.call("PING"), link.call("INCR", "n")]
        link.evalsha_post(COUNT, ["k"], [1])
        results = await asyncio.gather(*waiting, return_exceptions=True)
        took = time.monotonic() - started
        assert all(isinstance(r, Unreachable) for r in results), results
        assert "did not answer within 0.5 s" in str(results[0])
        assert 0.4 < took < 1.2, took
        assert dropped and "did not answer" in dropped[0]
        # The pausing client is paused too: once the pause is over, a new connection
        # answers (a PING sent while it lasts may time out once more).
        for _ in range(4):
            try:
                assert await link.call("PING") == b"PONG"
                break
            except Unreachable:
                continue
        else:
            raise AssertionError("no answer after the pause")
    finally:
        await other.aclose()


async def test_nothing_listening_fails_at_once() -> None:
    link = Link(f"redis://127.0.0.1:{_free_port()}/0")
    try:
        started = time.monotonic()
        with pytest.raises(Unreachable, match="cannot connect"):
            await link.call("PING")
        assert time.monotonic() - started < 0.5
    finally:
        await link.aclose()


async def test_an_error_reply_fails_its_own_command_only(link: Link) -> None:
    dropped: list[str] = []
    link.on_dropped = dropped.append
    assert await link.call("SET", "s", "text") == b"OK"
    assert await link.evalsha(COUNT, ["n"], [1]) == 1
    bad = link.send(pack_command(("INCR", "s")))
    link.evalsha_post(COUNT, ["s"], [1])
    good = link.send(pack_command(("GET", "s")))
    with pytest.raises(Unreachable, match="not an integer"):
        await bad
    assert await good == b"text"
    assert len(dropped) == 1 and "not an integer" in dropped[0]
    assert await link.call("PING") == b"PONG"


async def test_auth_and_select_come_from_the_url(tmp_path: Path) -> None:
    async with redis_server(tmp_path, "--requirepass", "s3cret") as redis:
        link = Link(f"redis://:s3cret@127.0.0.1:{redis.port}/3")
        wrong = Link(f"redis://:nope@127.0.0.1:{redis.port}/0")
        try:
            assert await link.call("SET", "where", "db3") == b"OK"
            info = (await link.call("CLIENT", "INFO")).decode()
            assert " db=3 " in info
            with pytest.raises(Unreachable, match="set-up"):
                await wrong.call("PING")
        finally:
            await link.aclose()
            await wrong.aclose()


async def test_unsupported_schemes_are_refused() -> None:
    with pytest.raises(ValueError):
        Link("redis+sentinel://127.0.0.1:1/0")


async def test_a_stalled_redis_never_holds_an_admission_past_the_timeout(
        redis: RedisServer) -> None:
    shared = SharedLimits(redis.url)
    await shared.start()
    gate = Gate(Admission(max_streams=10, max_streams_per_caller=5, rate=0.0, burst=1,
                          queue_timeout=1.0), shared=shared)
    other = Link(redis.url)
    try:
        request = pb.GenerateRequest(model="m", prompt="hi")
        admitted = await gate.check("alice", anonymous=False, request=request,
                                    model_call=True, budget=Budget(per_minute=100_000))
        assert admitted is not None and shared.leases == 1
        admitted.release()
        await other.call("CLIENT", "PAUSE", 1500, "ALL")
        started = time.monotonic()
        with pytest.raises(LimitsUnavailable):  # budgets fail closed by default
            await gate.check("alice", anonymous=False, request=request, model_call=True,
                             budget=Budget(per_minute=100_000))
        assert 0.4 < time.monotonic() - started < 1.2
        assert not shared.up
        started = time.monotonic()
        with pytest.raises(LimitsUnavailable):  # while down, no wait at all
            await gate.check("alice", anonymous=False, request=request, model_call=True,
                             budget=Budget(per_minute=100_000))
        assert time.monotonic() - started < 0.1
    finally:
        await other.aclose()
        await shared.aclose()


async def test_an_admission_cancelled_in_flight_gives_back_its_place_and_reservation(
        redis: RedisServer, link: Link) -> None:
    shared = SharedLimits(redis.url)
    await shared.start()
    gate = Gate(Admission(max_streams=10, max_streams_per_caller=5, rate=0.0, burst=1,
                          queue_timeout=1.0), shared=shared)
    try:
        request = pb.GenerateRequest(model="m", prompt="hi")
        check = asyncio.ensure_future(gate.check(
            "alice", anonymous=False, request=request, model_call=True,
            budget=Budget(per_minute=100_000)))
        await asyncio.sleep(0)  # its admission is queued: cancel it before the answer
        check.cancel()
        with pytest.raises(asyncio.CancelledError):
            await check
        # The end that the admission's answer started goes out with a later write, or after
        # its 10 ms wait; on a loaded machine that can come after a PING or two (a full run
        # with other work on the 2 cores once needed more than 2 s).
        deadline = time.monotonic() + 5.0
        for _ in range(500):
            if not await link.call("ZCARD", "tw:{lim}:c:alice") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert await link.call("ZCARD", "tw:{lim}:c:alice") == 0
        assert await link.call("ZCARD", "tw:{lim}:g") == 0
        level = float(await link.call("HGET", "tw:{lim}:m:alice", "level"))
        assert level >= 100_000 - 1  # the whole reservation given back
        assert shared.leases == 0
    finally:
        await shared.aclose()


async def test_rediss_urls_speak_tls_and_verify_the_server(tmp_path: Path, pki: Pki) -> None:
    tls_port = _free_port()
    async with redis_server(tmp_path, "--tls-port", str(tls_port), "--tls-cert-file",
                            str(pki.server.cert_path), "--tls-key-file",
                            str(pki.server.key_path), "--tls-ca-cert-file", str(pki.ca_path),
                            "--tls-auth-clients", "no"):
        trusted = Link(f"rediss://localhost:{tls_port}/0?ssl_ca_certs={pki.ca_path}")
        untrusted = Link(f"rediss://localhost:{tls_port}/0")  # the system's CAs only
        try:
            assert await trusted.evalsha(COUNT, ["k"], [4]) == 4
            with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.call("PING")
        finally:
            await trusted.aclose()
            await untrusted.aclose()


async def test_unix_urls_reach_a_local_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    async with redis_server(tmp_path, "--unixsocket", str(path)):
        link = Link(f"unix://{path}?db=2")
        try:
            assert await link.call("SET", "where", "db2") == b"OK"
            assert " db=2 " in (await link.call("CLIENT", "INFO")).decode()
        finally:
            await link.aclose()
