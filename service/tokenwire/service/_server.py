"""Server bootstrap: build the server, run it until a signal, drain, stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tokenwire.v1 import generation_pb2, generation_pb2_grpc

from ._address import AddressUnusable, describe_bind_failure
from ._config import Settings, redact_url
from ._health import HealthEndpoint, HealthMonitor
from ._metrics import Metrics, MetricsEndpoint
from ._reflection import enable_reflection
from ._servicer import GenerationServicer, StreamSettings
from ._validate import Limits
from ._workers import WorkerLink
from .backends._base import Backend
from .backends._factory import BackendOptions, build_backend
from .backends._router import Router
from .backends._upstreams import UpstreamsConfig, UpstreamsFile, UpstreamsFileError, single_upstream
from .guard._admission import Admission
from .guard._auth import CallerRegistry
from .guard._gate import Fallback, Gate
from .guard._http2 import core_options, settle_malloc
from .guard._interceptor import GuardInterceptor
from .orca import LoadMeter
from .resume import Retention, Streams
from .tracing import start_tracing

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is on
    from .tracing._otel import Tracing

__all__ = ["SERVICE_NAME", "Runtime", "build_server", "serve", "upstreams_of"]

log = logging.getLogger("tokenwire.service")

SERVICE_NAME: str = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
_HEALTH_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass
class Runtime:
    """A built, started server and the parts tests and the runner need."""

    server: grpc.aio.Server
    port: int
    health: HealthMonitor
    router: Router
    settings: Settings
    servicer: GenerationServicer
    #: The limits: ``in_use`` is the model calls this process has admitted and not ended.
    admission: Gate
    metrics: Metrics
    #: Serving ``/metrics``, when ``--metrics-listen`` is set.
    metrics_endpoint: MetricsEndpoint | None = None
    #: Serving health alone, plaintext and open, when ``--health-listen`` is set.
    health_endpoint: HealthEndpoint | None = None
    #: Exporting spans, when ``--otlp-endpoint`` (or OTEL_EXPORTER_OTLP_ENDPOINT) is set.
    tracing: Tracing | None = None

    @property
    def upstream(self) -> Backend:
        """The first upstream's backend (the only one with --ollama-url)."""
        return self.router.upstreams[0].backend

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    @property
    def health_target(self) -> str | None:
        return self.health_endpoint.target if self.health_endpoint is not None else None

    @property
    def target(self) -> str:
        return f"{self.settings.listen.rpartition(':')[0]}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING first (readiness and liveness); new calls still served for
        ``--drain-delay`` (within the grace), then no longer taken;
        in-flight model calls get ``grace`` seconds to finish; the ones still running
        then end with UNAVAILABLE (SHUTTING_DOWN) and keep what they already received;
        whatever is left (health watchers, reflection) is cancelled. The health port
        answers NOT_SERVING throughout and closes last."""
        grace = self.settings.shutdown_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.health.shutdown()
        # --drain-delay: new calls are still served while balancers see NOT_SERVING and
        # take this replica out; a call that reaches the stopped gRPC server below is not
        # refused but held until the drain is over, then cancelled.
        delay = min(self.settings.drain_delay, grace)
        if delay > 0:
            log.info("still taking new calls for %gs (--drain-delay)", delay)
            await asyncio.sleep(delay)
        # Takes no new call from here; the stop below with no grace ends the rest.
        stopping = asyncio.create_task(self.server.stop(max(deadline - loop.time(), 0) + 2.0))
        if not await self._model_calls_done(deadline):
            log.warning("grace period over: ending %d call(s) with UNAVAILABLE",
                        self.admission.in_use)
            self.servicer.interrupt_all()
            await self._model_calls_done(loop.time() + 1.0)  # their statuses go out
        await self.server.stop(None)
        await stopping
        await self.router.aclose()
        streams = self.servicer.streams
        if streams is not None and streams.redis is not None:
            await streams.redis.aclose()
        if self.admission.shared is not None:
            await self.admission.shared.aclose()  # after the calls' ends are written
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.aclose()
        if self.health_endpoint is not None:
            await self.health_endpoint.stop()
        if self.tracing is not None:  # the last spans go out (3 s at most)
            await self.tracing.close()

    async def _model_calls_done(self, deadline: float) -> bool:
        """Waits (polling; shutdown only) until no model call is admitted."""
        loop = asyncio.get_running_loop()
        while self.admission.in_use or self.servicer.active_streams:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True


def upstreams_of(settings: Settings) -> tuple[UpstreamsConfig, UpstreamsFile | None]:
    """The upstreams: from ``--upstreams-file`` (watched), else the ``--ollama-url``
    shortcut. Raises UpstreamsFileError."""
    if settings.upstreams_file:
        watch = UpstreamsFile(settings.upstreams_file)
        return watch.config, watch
    return single_upstream(settings.resolved_ollama_url()), None


def backend_options(settings: Settings) -> BackendOptions:
    trust = ssl.create_default_context(cafile=settings.upstream_ca_file or None)
    return BackendOptions(
        connect_timeout=settings.connect_timeout,
        max_connections=settings.upstream_connections,
        unary_timeout=settings.unary_timeout,
        ssl_context=trust,
        # An answer's JSON is a few times its message (numbers as text): room for that.
        max_body_bytes=4 * settings.max_message_bytes,
        breaker_threshold=settings.breaker_threshold,
        breaker_cooldown=settings.breaker_cooldown,
    )


async def build_server(settings: Settings, *, upstream: Backend | None = None,
                       reuse_port: bool = False) -> Runtime:
    """Builds and starts the server; returns it with its bound port. ``reuse_port`` lets
    it share the port with the other workers of a ``--workers`` supervisor. ``upstream``
    replaces the configured upstreams with one given backend. Raises
    UpstreamsFileError when the upstreams cannot be built."""
    if upstream is not None:
        router = Router.of(upstream)
    else:
        config, watch = upstreams_of(settings)
        options = backend_options(settings)
        router = Router(config, lambda spec: build_backend(spec, options),
                        failover_timeout=settings.failover_timeout, watch=watch)
    metrics = Metrics()
    tracing = start_tracing(settings.otlp_endpoint)
    registry = CallerRegistry(settings.callers_file or None, CallerRegistry.env_tokens())
    admission = Admission(
        max_streams=settings.max_streams,
        max_streams_per_caller=settings.max_streams_per_caller,
        max_streams_per_peer=settings.max_streams_per_peer,
        rate=settings.rate, rate_per_peer=settings.rate_per_peer, burst=settings.burst,
        queue_timeout=settings.queue_timeout)
    shared = None
    if settings.redis_url:
        from .guard._shared import SharedLimits  # redis-py: only when it is used

        shared = SharedLimits(settings.redis_url, lease_ttl=settings.redis_lease_ttl)
    gate = Gate(admission, shared=shared, server_output_cap=settings.max_output_tokens,
                fallback=Fallback(streams=settings.redis_down_streams,
                                  rate=settings.redis_down_rate,
                                  budgets=settings.redis_down_budgets),
                on_budget=metrics.budget)
    guard = GuardInterceptor(
        admission=gate,
        registry=registry,
        allowed_cert_names=[p.strip() for p in settings.tls_allowed_clients.split(",")
                            if p.strip()],
        mtls=bool(settings.tls_client_ca),
        open_health=settings.open_health,
        metrics=metrics,
        tracing=tracing,
        load=LoadMeter(settings.max_streams, horizon=settings.load_report_window)
        if settings.load_reports else None,
        early_headers=settings.initial_metadata == "early",
    )
    _warn_unused_caller_limits(settings, identifies=registry.enabled or bool(
        settings.tls_client_ca))
    server = grpc.aio.server(
        interceptors=[guard],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            *_connection_age(settings),
            ("grpc.so_reuseport", int(reuse_port)),
            *core_options(settings.max_pending_calls),
        ],
    )
    redis = None
    if settings.redis_url:
        from .resume._redis import RedisStreams  # redis-py: only when it is used

        redis = RedisStreams(settings.redis_url, retention=settings.resume_retention,
                             max_entries=max(settings.resume_max_stream_bytes // 16, 1024),
                             connect_timeout=settings.connect_timeout)
    servicer = GenerationServicer(
        router,
        limits=Limits(max_prompt_bytes=settings.max_prompt_bytes,
                      max_images_bytes=settings.max_images_bytes,
                      max_messages=settings.max_messages,
                      max_output_tokens=settings.max_output_tokens),
        stream=StreamSettings(first_token_timeout=settings.first_token_timeout,
                              idle_timeout=settings.idle_timeout,
                              retries=settings.upstream_retries,
                              retry_backoff=settings.retry_backoff,
                              max_output_tokens=settings.max_output_tokens,
                              max_pending_bytes=min(4 << 20, settings.max_message_bytes),
                              max_message_bytes=settings.max_message_bytes),
        metrics=metrics,
        # A --workers process (reuse_port) without Redis: a Resume could reach another
        # worker, which would not have the stream.
        streams=None if (reuse_port or settings.workers > 1) and redis is None else Streams(
            Retention(detach_grace=settings.detach_grace, retention=settings.resume_retention,
                      max_stream_bytes=settings.resume_max_stream_bytes,
                      max_bytes=settings.resume_max_bytes), redis),
        no_streams="resumable streams need one server process or a shared store: with "
                   "--workers, a Resume could reach a worker that does not hold the stream; "
                   "run the server with --workers 1, or give it --redis-url",
        tracing=tracing,
    )
    if servicer.streams is not None:
        servicer.streams.on_change = metrics.resumable
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, _HEALTH_NAME), server)
    try:
        port = _bind(server, settings)
    except RuntimeError:  # gRPC's "Failed to bind", without the cause: find it
        raise describe_bind_failure(settings.listen, "--listen",
                                    tls=bool(settings.tls_cert)) from None
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    monitor = HealthMonitor(health_servicer, router, (SERVICE_NAME,),
                            interval=settings.health_interval, metrics=metrics)
    probes = None
    if settings.health_listen:
        # No registry: the probe port asks for no credentials (it serves health alone).
        probes = HealthEndpoint(health_servicer, [GuardInterceptor(
            admission=gate, metrics=metrics)], reuse_port=reuse_port)
        probes.bind(settings.health_listen)
    endpoint = None
    if settings.metrics_listen:
        endpoint = MetricsEndpoint(metrics.registry)
        await endpoint.start(settings.metrics_listen)
    if shared is not None:
        shared.on_state = lambda up: monitor.limits(up)
        await shared.start()
        monitor.limits(shared.up)
    if redis is not None:
        redis.on_state = lambda up: monitor.resumable(up)
        await redis.start()
        monitor.resumable(redis.up)
    await router.start()  # discover=true upstreams are listed before the first call
    await monitor.prime()
    await server.start()
    if probes is not None:
        await probes.start()
    await monitor.start()
    return Runtime(server, port, monitor, router, settings, servicer, gate, metrics,
                   endpoint, probes, tracing)


def _warn_unused_caller_limits(settings: Settings, *, identifies: bool) -> None:
    """Per-caller limits need callers that can be identified; say so rather than
    let an explicit --rate or --max-streams-per-caller do nothing in silence."""
    if identifies:
        return
    unused = [flag for flag, changed in (
        ("--rate", settings.rate > 0),
        ("--max-streams-per-caller",
         settings.max_streams_per_caller != Settings.max_streams_per_caller)) if changed]
    if unused:
        log.warning("%s limit(s) identified callers only, and without --callers-file, "
                    "TOKENWIRE_AUTH_TOKENS or --tls-client-ca every caller is anonymous; "
                    "anonymous callers are limited per peer address by --rate-per-peer and "
                    "--max-streams-per-peer", " and ".join(unused))


def _connection_age(settings: Settings) -> list[tuple[str, int]]:
    """gRPC's MAX_CONNECTION_AGE and its grace: an aged connection gets GOAWAY, the client
    reconnects (through the balancer, perhaps to another replica) for its next calls, and
    the calls still running keep the old connection for the grace."""
    if settings.max_connection_age <= 0:
        return []
    options = [("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000))]
    if settings.max_connection_age_grace > 0:
        options.append(("grpc.max_connection_age_grace_ms",
                        int(settings.max_connection_age_grace * 1000)))
    return options


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    if not settings.tls_cert:
        return int(server.add_insecure_port(settings.listen))
    with open(settings.tls_key, "rb") as key, open(settings.tls_cert, "rb") as cert:
        pair = (key.read(), cert.read())
    client_ca = None
    if settings.tls_client_ca:
        with open(settings.tls_client_ca, "rb") as ca:
            client_ca = ca.read()
    credentials = grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None)
    return int(server.add_secure_port(settings.listen, credentials))


def _settle_gc() -> None:
    """Keeps the cycle collector off the token path. Everything alive after start-up
    (modules, descriptors, the server) is frozen out of its scans, and the youngest
    generation is collected every 20,000 allocations instead of 700: the profile at
    1000 streams showed collections at 6-8% of the event loop's time, nearly all of it
    re-scanning long-lived objects. Reference counting still frees everything that is
    not in a cycle at once."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(20_000, gen1, gen2)


async def serve(settings: Settings, worker: WorkerLink | None = None) -> int:
    """Runs until SIGTERM or SIGINT (or, for a worker, until its supervisor is gone),
    then drains. Returns the exit code."""
    try:
        runtime = await build_server(settings, reuse_port=worker is not None)
    except AddressUnusable as exc:  # taken since main() checked it
        log.error("cannot start: %s", exc)
        return 2
    except (OSError, UpstreamsFileError) as exc:  # a file missing or bad
        log.error("cannot start: %s", exc)
        return 1
    _settle_gc()
    settle_malloc()
    upstreams = runtime.router.upstreams
    log.info("tokenwire-server %s %s (%s: %s)",
             "listening on" if worker is None else "worker serving on", runtime.target,
             f"upstream {redact_url(upstreams[0].backend.base_url)}" if len(upstreams) == 1
             else f"{len(upstreams)} upstreams", "reachable" if runtime.health.serving
             else "NOT reachable yet")
    for upstream in upstreams:
        if len(upstreams) > 1 and not upstream.up:
            log.warning("upstream %s (%s) is NOT reachable yet", upstream.name,
                        upstream.backend.base_url)
    if runtime.metrics_endpoint is not None:
        log.info("metrics on %s", runtime.metrics_endpoint.url)
    if runtime.tracing is not None and worker is None:
        log.info("traces exported to %s (OTLP/gRPC)", redact_url(runtime.tracing.endpoint))
    if runtime.health_endpoint is not None and worker is None:
        log.info("health checks on %s (plaintext, health only, no credentials)",
                 runtime.health_endpoint.target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is not None:
        worker.ready(stop.set)
    await stop.wait()
    log.info("shutting down: NOT_SERVING, draining in-flight calls for up to %gs",
             settings.shutdown_grace)
    await runtime.stop()
    log.info("stopped")
    return 0
