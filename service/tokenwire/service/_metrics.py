"""Prometheus figures, and the small HTTP endpoint that serves them.

What is measured (all names start with ``tokenwire_``):

    rpcs_total{method, code}                     calls ended, by gRPC status code
    rpc_errors_total{method, reason}             failed calls, by ErrorInfo reason
    rpc_duration_seconds{method}                 call duration (histogram)
    time_to_first_token_seconds{method}          model calls: request to first token
    stream_tokens_per_second{method}             model calls: the gateway's delivery rate
    tokens_total{kind}                           Ollama's counts: prompt, completion
    model_calls_in_flight                        admitted model calls now running
    upstream_up{upstream}                        1 when the last health probe reached that
                                                 upstream and its circuit is closed

``method`` is the bare method name (``Generate``, ``Check``, ``ServerReflectionInfo``), the
access log's ``method`` too; ``reason`` is the ErrorInfo reason of the failed call's status,
which the access log gives as ``reason``.

Labels are bounded: method names, status codes and reasons come from fixed tables, and
upstream names from the server's configuration (never from a request). The
model name is a caller's string and is never a label; prompt and answer text are never
recorded. Each figure is taken once per call, never per token.

With ``--workers N`` every worker writes its figures to a shared directory
(prometheus_client's multiprocess mode) and the supervisor serves their sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["MULTIPROC_ENV", "Metrics", "MetricsEndpoint", "multiprocess_registry", "worker_dead"]

log = logging.getLogger("tokenwire.service")

#: prometheus_client's own variable: set, it keeps every figure in files under it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: from a few ms (a warm model's first token) to a cold load of many minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0)
_RATE_BUCKETS = (1.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0)


class Metrics:
    """The figures of one server process, in their own registry (so that several
    servers can live in one test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self._rpcs = Counter("tokenwire_rpcs", "gRPC calls ended, by method and status code",
                             ("method", "code"), registry=reg)
        self._errors = Counter("tokenwire_rpc_errors",
                               "Failed calls, by method and google.rpc.ErrorInfo reason",
                               ("method", "reason"), registry=reg)
        self._duration = Histogram("tokenwire_rpc_duration_seconds", "Call duration",
                                   ("method",), buckets=_LATENCY_BUCKETS, registry=reg)
        self._ttft = Histogram("tokenwire_time_to_first_token_seconds",
                               "Model calls: from the request to the first token sent",
                               ("method",), buckets=_LATENCY_BUCKETS, registry=reg)
        self._rate = Histogram("tokenwire_stream_tokens_per_second",
                               "Model calls: tokens per second as the gateway delivered them",
                               ("method",), buckets=_RATE_BUCKETS, registry=reg)
        self._tokens = Counter("tokenwire_tokens", "Tokens counted by Ollama in finished "
                               "model calls, by kind (prompt, completion)", ("kind",),
                               registry=reg)
        self._in_flight = Gauge("tokenwire_model_calls_in_flight",
                                "Admitted model calls now running", registry=reg,
                                multiprocess_mode="livesum")
        self._upstream_up = Gauge("tokenwire_upstream_up",
                                  "1 when the last health probe reached the upstream (by its "
                                  "configured name) and its circuit is closed, else 0",
                                  ("upstream",), registry=reg, multiprocess_mode="livemin")
        self._redis_up = Gauge("tokenwire_redis_up",
                               "With --redis-url: 1 while Redis (the store of resumable streams) "
                               "answers, else 0", registry=reg, multiprocess_mode="livemin")
        self._resumable = Gauge("tokenwire_resumable_streams",
                                "Resumable streams this process holds, by state: live "
                                "(generating) or kept (ended, kept for Resume)", ("state",),
                                registry=reg, multiprocess_mode="livesum")
        self._resumable_bytes = Gauge("tokenwire_resumable_bytes",
                                      "Bytes the resumable streams of this process hold "
                                      "(updated as streams start and end)", registry=reg,
                                      multiprocess_mode="livesum")
        self._limits_shared = Gauge("tokenwire_limits_shared",
                                    "With --redis-url: 1 while admission limits and token "
                                    "budgets are decided in Redis, 0 while they follow "
                                    "--redis-down-*", registry=reg, multiprocess_mode="livemin")
        self._budget_tokens = Counter("tokenwire_budget_tokens",
                                      "Token budgets: tokens reserved at admission, and "
                                      "tokens the calls really used (settled)", ("kind",),
                                      registry=reg)
        self._budget_refusals = Counter("tokenwire_budget_refusals",
                                        "Model calls refused because their reservation did "
                                        "not fit in the caller's budget, by window "
                                        "(minute, day)", ("window",), registry=reg)
        self._prompt_tokens = self._tokens.labels("prompt")
        self._completion_tokens = self._tokens.labels("completion")
        # Labelled children by label values: ``labels()`` validates and locks on every use.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: MetricWrapperBase, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def call_ended(self, method: str, code: str, reason: str | None, seconds: float) -> None:
        """``method``: the bare method name (``Generate``, ``Check``), as the access log
        writes it."""
        self._child(self._rpcs, method, code).inc()
        if reason is not None:
            self._child(self._errors, method, reason).inc()
        self._child(self._duration, method).observe(seconds)

    def stream_finished(self, method: str, ttft: float | None, tokens_per_second: float,
                        prompt_tokens: int, completion_tokens: int) -> None:
        if ttft is not None:
            self._child(self._ttft, method).observe(ttft)
        if tokens_per_second > 0:
            self._child(self._rate, method).observe(tokens_per_second)
        self._prompt_tokens.inc(prompt_tokens)
        self._completion_tokens.inc(completion_tokens)

    def admitted(self) -> None:
        self._in_flight.inc()

    def released(self) -> None:
        self._in_flight.dec()

    def upstream_reachable(self, upstream: str, up: bool) -> None:
        """``upstream``: a configured name (bounded by the configuration)."""
        self._child(self._upstream_up, upstream).set(1 if up else 0)

    def resumable(self, live: int, kept: int, held: int) -> None:
        self._child(self._resumable, "live").set(live)
        self._child(self._resumable, "kept").set(kept)
        self._resumable_bytes.set(held)

    def redis_reachable(self, up: bool) -> None:
        self._redis_up.set(1 if up else 0)

    def limits_shared(self, up: bool) -> None:
        self._limits_shared.set(1 if up else 0)

    def budget(self, event: str, tokens: int) -> None:
        """A token budget event: reserved or settled (tokens), refused_minute/_day."""
        if event.startswith("refused_"):
            self._child(self._budget_refusals, event.removeprefix("refused_")).inc()
        else:
            self._child(self._budget_tokens, event).inc(tokens)

    def forget_upstream(self, upstream: str) -> None:
        """An upstream left the configuration: its series goes too."""
        self._children.pop((self._upstream_up, upstream), None)
        try:
            self._upstream_up.remove(upstream)
        except KeyError:
            pass


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that reads the sum of what the workers wrote under ``path``."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


class MetricsEndpoint:
    """``GET /metrics`` over HTTP/1.1 on the event loop (no thread): one answer per
    connection, Prometheus text or OpenMetrics as the scraper's Accept asks."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None
        #: Once started: the bound port, and the URL to scrape.
        self.port = 0
        self.url = ""

    async def start(self, listen: str) -> int:
        """Listens on ``host:port`` (port 0 picks one); returns the bound port."""
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._answer, host.strip("[]") or None,
                                                  int(port))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.url = f"http://{host}:{self.port}/metrics"
        return self.port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, *_ = (lines[0].split(" ") + ["", ""])[:3]
            accept = next((line.partition(":")[2].strip() for line in lines[1:]
                           if line.lower().startswith("accept:")), "")
            if method not in ("GET", "HEAD"):
                status, kind, body = "405 Method Not Allowed", "text/plain", b"use GET\n"
            elif path.split("?")[0] != "/metrics":
                status, kind, body = "404 Not Found", "text/plain", b"see /metrics\n"
            else:
                encoder, kind = choose_encoder(accept)
                status, body = "200 OK", encoder(self._registry)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # a scrape must never take the server down
            log.exception("metrics endpoint: answering a scrape failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def worker_dead(pid: int, path: str) -> None:
    """Drops a finished worker's live gauges from the sum kept under ``path``."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
