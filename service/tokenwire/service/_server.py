"""Server bootstrap: build the server, run it until a signal, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenwire.v1 import generation_pb2, generation_pb2_grpc

from ._config import Settings
from ._health import HealthMonitor
from ._interceptors import RequestInterceptor
from ._servicer import GenerationServicer, StreamSettings
from ._upstream import OllamaUpstream
from ._validate import Limits

__all__ = ["SERVICE_NAME", "Runtime", "build_server", "serve"]

log = logging.getLogger("tokenwire.service")

SERVICE_NAME: str = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
_HEALTH_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass
class Runtime:
    """A built, started server and the parts tests and the runner need."""

    server: grpc.aio.Server
    port: int
    health: HealthMonitor
    upstream: OllamaUpstream
    settings: Settings

    @property
    def target(self) -> str:
        return f"{self.settings.listen.rpartition(':')[0]}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then refuse new calls and let in-flight ones
        finish within ``grace`` seconds, then close the upstream pool."""
        await self.health.shutdown()
        await self.server.stop(self.settings.shutdown_grace if grace is None else grace)
        await self.upstream.aclose()


async def build_server(settings: Settings, *, upstream: OllamaUpstream | None = None) -> Runtime:
    """Builds and starts the server; returns it with its bound port."""
    upstream = upstream or OllamaUpstream(
        settings.resolved_ollama_url(),
        connect_timeout=settings.connect_timeout,
        max_connections=settings.upstream_connections,
    )
    server = grpc.aio.server(
        interceptors=[RequestInterceptor()],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = GenerationServicer(
        upstream,
        limits=Limits(max_prompt_bytes=settings.max_prompt_bytes,
                      max_images_bytes=settings.max_images_bytes),
        stream=StreamSettings(first_token_timeout=settings.first_token_timeout,
                              idle_timeout=settings.idle_timeout),
    )
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, _HEALTH_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    monitor = HealthMonitor(health_servicer, upstream, (SERVICE_NAME,),
                            interval=settings.health_interval)
    await server.start()
    await monitor.start()
    return Runtime(server, port, monitor, upstream, settings)


async def serve(settings: Settings) -> int:
    """Runs until SIGTERM or SIGINT, then drains. Returns the exit code."""
    runtime = await build_server(settings)
    log.info("tokenwire-server listening on %s (upstream %s: %s)", runtime.target,
             settings.resolved_ollama_url(),
             "reachable" if runtime.health.serving else "NOT reachable yet")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: NOT_SERVING, draining in-flight calls for up to %gs",
             settings.shutdown_grace)
    await runtime.stop()
    log.info("stopped")
    return 0
