"""Health: SERVING only while Ollama answers; NOT_SERVING before shutdown."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from ._exceptions import UpstreamError
from ._metrics import Metrics
from ._upstream import OllamaUpstream

__all__ = ["HealthMonitor"]

log = logging.getLogger("tokenwire.service")


class HealthMonitor:
    """Probes the upstream every ``interval`` seconds and publishes the result
    for the overall server ("") and for each named service."""

    def __init__(self, servicer: health.aio.HealthServicer, upstream: OllamaUpstream,
                 services: tuple[str, ...], *, interval: float,
                 metrics: Metrics | None = None) -> None:
        self._servicer = servicer
        self._metrics = metrics
        self._upstream = upstream
        self._services = ("", *services)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self.serving: bool | None = None
        self._stopping = False
        upstream.breaker.on_change = self._breaker_changed

    def _breaker_changed(self, is_open: bool) -> None:
        """An open circuit means NOT_SERVING now, not at the next probe."""
        if self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._publish(not is_open))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, serving: bool) -> None:
        if serving != self.serving:
            log.info("upstream %s", "reachable: SERVING" if serving else "unreachable: NOT_SERVING")
        self.serving = serving
        if self._metrics is not None:
            self._metrics.upstream_reachable(serving)
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self._services:
            await self._servicer.set(name, status)

    async def check_once(self) -> bool:
        try:
            await self._upstream.version(timeout=min(self._interval, 5.0))
            ok = True
        except UpstreamError:
            ok = False
        if not self._stopping:
            await self._publish(ok)
        return ok

    async def _loop(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval)

    async def start(self) -> None:
        await self.check_once()
        self._task = asyncio.create_task(self._loop())

    async def shutdown(self) -> None:
        """NOT_SERVING from now on; stops probing."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        await self._publish(False)
