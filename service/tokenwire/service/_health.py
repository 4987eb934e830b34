"""Health for orchestrators: liveness (the process serves) apart from readiness (an
upstream can serve).

Health service names, all answered by the one HealthServicer (on the main port and, with
``--health-listen``, on the probe port):

    ""                              readiness (gRPC's "whole server" name, as before)
    "tokenwire.v1.GenerationService" readiness
    "readiness"                     SERVING while at least one upstream answers its probe
                                    and its circuit is closed
    "liveness"                      SERVING while the process serves; NOT_SERVING once
                                    shutdown begins; never follows Ollama
    "resumable"                     with --redis-url: SERVING while Redis answers (resumable
                                    starts are refused meanwhile; plain calls are not)
    "limits"                        with --redis-url: SERVING while the shared limits and
                                    budgets are decided in Redis; NOT_SERVING while they
                                    follow --redis-down-* (the gateway itself still serves)

They are apart because a liveness probe that follows Ollama makes Kubernetes restart
every healthy gateway during an Ollama outage, which fixes nothing and drops the calls
the gateway could still refuse cleanly; readiness is what should take a gateway out of
a Service's endpoints meanwhile.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ._address import describe_bind_failure
from ._metrics import Metrics
from .backends._router import Router

__all__ = ["LIMITS", "LIVENESS", "READINESS", "RESUMABLE", "HealthEndpoint", "HealthMonitor"]

log = logging.getLogger("tokenwire.service")

LIVENESS = "liveness"
READINESS = "readiness"
RESUMABLE = "resumable"
LIMITS = "limits"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    """Probes every upstream every ``interval`` seconds (all at once) and publishes the
    result as readiness, for the overall server (""), "readiness" and each named
    service: SERVING while at least one upstream can serve. Each upstream's state is
    the metric ``tokenwire_upstream_up{upstream="<configured name>"}``. Liveness is
    SERVING from ``start`` until ``shutdown``."""

    def __init__(self, servicer: health.aio.HealthServicer, upstreams: Router,
                 services: tuple[str, ...], *, interval: float,
                 metrics: Metrics | None = None) -> None:
        self._servicer = servicer
        self._metrics = metrics
        self._router = upstreams
        self._services = ("", READINESS, *services)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self._shown: set[str] = set()  # upstream names the metric has
        self.serving: bool | None = None
        self._stopping = False
        upstreams.on_change = self._changed

    def _changed(self) -> None:
        """A circuit opened or closed, or the upstreams were reloaded: publish now, not
        at the next probe."""
        if self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._publish())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, serving: bool | None = None) -> None:
        if serving is None:
            serving = self._router.ready
            if self._metrics is not None:
                names = set()
                for upstream in self._router.upstreams:
                    names.add(upstream.name)
                    self._metrics.upstream_reachable(upstream.name, upstream.up)
                for gone in self._shown - names:
                    self._metrics.forget_upstream(gone)
                self._shown = names
        if serving != self.serving:
            log.info("%s", "an upstream is reachable: SERVING" if serving
                     else "no upstream is reachable: NOT_SERVING")
        self.serving = serving
        status = _SERVING if serving else _NOT_SERVING
        for name in self._services:
            await self._servicer.set(name, status)

    def resumable(self, up: bool) -> None:
        """Redis (the store of resumable streams) is reachable or not: the "resumable"
        health name and ``tokenwire_redis_up`` follow it."""
        if self._metrics is not None:
            self._metrics.redis_reachable(up)
        self._set_soon(RESUMABLE, up)

    def limits(self, up: bool) -> None:
        """The shared limits are decided in Redis, or not: the "limits" health name and
        ``tokenwire_limits_shared`` follow it."""
        if self._metrics is not None:
            self._metrics.limits_shared(up)
        self._set_soon(LIMITS, up)

    def _set_soon(self, name: str, up: bool) -> None:
        status = _SERVING if up and not self._stopping else _NOT_SERVING
        task = asyncio.get_running_loop().create_task(self._servicer.set(name, status))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def check_once(self) -> bool:
        await self._router.probe_all(min(self._interval, 5.0))
        if not self._stopping:
            await self._publish()
        return bool(self.serving)

    async def _loop(self) -> None:
        while True:  # ``start`` made the first probe
            await asyncio.sleep(self._interval)
            await self.check_once()

    async def prime(self) -> None:
        """Before the ports open: alive, and not ready until the first probe says so
        (grpcio's servicer would otherwise answer "" with SERVING meanwhile)."""
        await self._servicer.set(LIVENESS, _SERVING)
        for name in self._services:
            await self._servicer.set(name, _NOT_SERVING)

    async def start(self) -> None:
        await self.check_once()
        self._task = asyncio.create_task(self._loop())

    async def shutdown(self) -> None:
        """NOT_SERVING from now on, liveness too; stops probing."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        await self._publish(False)
        await self._servicer.set(LIVENESS, _NOT_SERVING)
        await self._servicer.set(RESUMABLE, _NOT_SERVING)
        await self._servicer.set(LIMITS, _NOT_SERVING)


class HealthEndpoint:
    """``--health-listen``: a second grpc.aio server, plaintext, in the same event loop,
    serving the same HealthServicer and nothing else (no reflection, no model calls, no
    credentials asked). It exists because kubelet's gRPC probe connects without TLS
    (or, where TLS probes exist, without a client certificate) and sends no metadata,
    so it can pass neither tokens nor mTLS on the main port."""

    def __init__(self, servicer: health.aio.HealthServicer,
                 interceptors: list[grpc.aio.ServerInterceptor], *,
                 reuse_port: bool = False) -> None:
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.so_reuseport", int(reuse_port)),
            # A probe's request is a service name: nothing near gRPC's 4 MiB default.
            ("grpc.max_receive_message_length", 64 * 1024),
        ])
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self._server)
        self.port = 0
        self.host = ""

    def bind(self, listen: str) -> None:
        try:
            self.port = int(self._server.add_insecure_port(listen))
        except RuntimeError:  # gRPC's "Failed to bind", without the cause: find it
            raise describe_bind_failure(listen, "--health-listen") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {listen} (--health-listen)")
        self.host = listen.rpartition(":")[0]

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop(None)
