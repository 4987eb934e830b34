"""``--workers N``: a supervisor and N server processes on one port (SO_REUSEPORT).

Which worker served a call is read from the access log, whose lines carry
``worker=<index>`` and the call's request id.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fakeollama import FakeOllama
from tests.helpers import (
    OWN_CONNECTION,
    ServerProcess,
    joined,
    samples,
    scrape,
    served_by,
    server_process,
    value,
)
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

WORKERS = ("--workers", "2")


def _pid(server: ServerProcess, index: int) -> int:
    pids = re.findall(rf"worker {index} starting \(pid (\d+)\)", server.output)
    return int(pids[-1])


async def _served_by(server: ServerProcess, fake: FakeOllama, calls: int) -> set[int]:
    def check(tokens: list[pb.Token]) -> None:
        assert joined(tokens) == "".join(fake.tokens) and tokens[-1].done

    return await served_by(server, calls, pb.GenerateRequest(model="tiny", prompt="p"), check)


async def test_workers_share_the_port_and_drain_on_sigterm(fake: FakeOllama) -> None:
    async with server_process(fake.url, *WORKERS, TOKENWIRE_SHUTDOWN_GRACE="3") as server:
        assert "listening on 127.0.0.1:" in server.output
        assert "with 2 workers" in server.output
        pids = [_pid(server, 0), _pid(server, 1)]
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert await _served_by(server, fake, 16) == {0, 1}

        fake.tokens = [f"w{i} " for i in range(30)]
        fake.token_delay = 0.03  # ~0.9 s: finishes within the grace period
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(model="tiny", prompt="p"), timeout=10)
            tokens = [await call.read()]
            started = loop.time()
            server.proc.send_signal(signal.SIGTERM)
            while (token := await call.read()) is not grpc.aio.EOF:
                tokens.append(token)
        code = await server.exited()
        exited_after = loop.time() - started
    assert code == 0, server.output
    assert exited_after < 3.0
    assert tokens[-1].done and joined(tokens) == "".join(fake.tokens)
    assert server.output.count("tokenwire.service stopped") == 2
    for pid in pids:  # gone and reaped, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_killed_worker_is_restarted(fake: FakeOllama) -> None:
    async with server_process(fake.url, *WORKERS, TOKENWIRE_SHUTDOWN_GRACE="1") as server:
        pid = _pid(server, 0)
        os.kill(pid, signal.SIGKILL)
        line = await server.wait_for(f"worker 0 (pid {pid}) exited with signal SIGKILL")
        assert " ERROR " in line and "restarting it in 0.5s" in line
        assert await _served_by(server, fake, 2) == {1}  # the port keeps serving meanwhile
        await server.wait_for("worker 0 restarted")
        assert _pid(server, 0) != pid
        assert await _served_by(server, fake, 16) == {0, 1}
        assert await server.stop() == 0, server.output


async def test_a_worker_that_cannot_start_stops_everything(fake: FakeOllama,
                                                           tmp_path: object) -> None:
    missing = f"{tmp_path}/missing.pem"
    async with server_process(fake.url, *WORKERS, ready=False, TOKENWIRE_TLS_CERT=missing,
                              TOKENWIRE_TLS_KEY=missing) as server:
        assert await server.exited() == 1
    assert f"No such file or directory: '{missing}'" in server.output
    assert "before it served; stopping the others" in server.output
    assert "restart" not in server.output and "listening on" not in server.output


async def test_workers_stop_when_the_supervisor_is_killed(fake: FakeOllama) -> None:
    async with server_process(fake.url, *WORKERS, TOKENWIRE_SHUTDOWN_GRACE="1") as server:
        host, port = server.target.rsplit(":", 1)
        assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
    for _ in range(100):  # the workers see their link close, drain and stop
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except ConnectionRefusedError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{server.target} still accepts connections")


async def test_metrics_are_the_sum_of_all_workers(fake: FakeOllama) -> None:
    async with server_process(fake.url, *WORKERS, "--metrics-listen", "127.0.0.1:0",
                              TOKENWIRE_SHUTDOWN_GRACE="1") as server:
        line = await server.wait_for("the sum of all workers")
        port = int(re.findall(r"http://127\.0\.0\.1:(\d+)/metrics", line)[0])
        assert await _served_by(server, fake, 16) == {0, 1}
        found = samples((await scrape(port)).text)
        assert value(found, "tokenwire_rpcs_total", method="Generate", code="OK") == 16
        assert value(found, "tokenwire_tokens_total", kind="completion") == 16 * len(fake.tokens)
        assert value(found, "tokenwire_model_calls_in_flight") == 0
        # A worker that dies takes nothing with it: its counts stay in the sum.
        pid = _pid(server, 0)
        os.kill(pid, signal.SIGKILL)
        await server.wait_for("worker 0 restarted")
        assert await _served_by(server, fake, 4)
        found = samples((await scrape(port)).text)
        assert value(found, "tokenwire_rpcs_total", method="Generate", code="OK") == 20
        assert await server.stop() == 0, server.output


async def test_workers_share_the_health_port(fake: FakeOllama) -> None:
    """--health-listen with --workers: the supervisor reserves the port like the main
    one, every worker serves it (SO_REUSEPORT), without credentials."""
    async with server_process(fake.url, *WORKERS, "--health-listen", "127.0.0.1:0",
                              TOKENWIRE_AUTH_TOKENS="ops=tw-ops-1", TOKENWIRE_SHUTDOWN_GRACE="2",
                              ) as server:
        line = await server.wait_for("health checks on ")
        target = line.split("health checks on ")[1].split()[0]
        assert not target.endswith(":0") and target != server.target

        async def probe(rid: str) -> int:
            async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="liveness"), timeout=5,
                    metadata=(("x-request-id", rid),))
                return int(answer.status)

        rids = [f"probe-{i}-{os.urandom(3).hex()}" for i in range(16)]
        assert await asyncio.gather(*(probe(r) for r in rids)) == \
            [health_pb2.HealthCheckResponse.SERVING] * len(rids)
        workers = set()
        for rid in rids:
            logged = await server.wait_for(f"rid={rid} ")
            workers.add(int(re.findall(r" worker=(\d+) tokenwire\.access ", logged)[0]))
        assert workers == {0, 1}
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exited() == 0, server.output


async def test_workers_refuse_resumable_streams_saying_why(fake: FakeOllama) -> None:
    """A Resume could reach a worker that does not hold the stream: refused, not lost."""
    async with server_process(fake.url, *WORKERS) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = GenerationServiceStub(channel)
            calls = [
                stub.Generate(pb.GenerateRequest(model="tiny", prompt="p",
                                                 resumable=pb.Resumable())),
                stub.Resume(pb.ResumeRequest(stream_id="A" * 24)),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in call:
                        pass
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "--workers 1" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Start(pb.StartRequest(generate=pb.GenerateRequest(
                    model="tiny", prompt="p")))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # Plain streams are served as before.
            tokens = [t async for t in stub.Generate(pb.GenerateRequest(model="tiny",
                                                                        prompt="p"))]
            assert tokens[-1].done
