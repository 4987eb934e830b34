"""A real OpenTelemetry Collector for the tracing tests: built from the Go module proxy by
scripts/otelcol (the OTLP receiver and the debug exporter of the core distribution),
run on a free loopback port, its detailed debug output (every span it received, with
its resource, attributes and events) read back and parsed into ``Span``s."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.parts import ROOT, _free_port


def collector_binary() -> str:
    """The collector's path, built first when it is missing (minutes, once)."""
    done = subprocess.run([str(ROOT / "scripts" / "otelcol")], check=True,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Span:
    trace_id: str
    parent_id: str
    span_id: str
    name: str
    kind: str
    status: str
    #: Attribute values as the debug exporter prints them: Str(x) -> "x", Int(5) -> 5,
    #: Double(0.5) -> 0.5, Bool(true) -> True, Slice(["a"]) -> the text ``["a"]``.
    attributes: dict[str, object] = field(default_factory=dict)
    resource: dict[str, object] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    #: The spans it links to: (trace id, span id).
    links: list[tuple[str, str]] = field(default_factory=list)


#: The span fields of the detailed output, by their label there.
_FIELDS = {"Trace ID": "trace_id", "Parent ID": "parent_id", "ID": "span_id", "Name": "name",
           "Kind": "kind", "Status code": "status"}
_VALUE = re.compile(r"^(\w+)\((.*)\)$", re.S)


def _value(text: str) -> object:
    match = _VALUE.match(text)
    if match is None:
        return text
    kind, raw = match.groups()
    if kind == "Int":
        return int(raw)
    if kind == "Double":
        return float(raw)
    if kind == "Bool":
        return raw == "true"
    return raw


def parse(output: str) -> list[Span]:
    """The spans in the debug exporter's detailed output."""
    spans: list[Span] = []
    resource: dict[str, object] = {}
    section = ""
    span: Span | None = None
    for line in output.splitlines():
        stripped = line.strip()
        if line.startswith("ResourceSpans #"):
            resource, section, span = {}, "resource", None
        elif line.startswith("Resource attributes:"):
            section = "resource"
        elif line.startswith("Span #"):
            span = Span("", "", "", "", "", "", resource=resource)
            spans.append(span)
            section = "span"
        elif line.startswith("Attributes:"):
            section = "attributes"
        elif line.startswith("Events:"):
            section = "events"
        elif line.startswith("Links:"):
            section = "links"
        elif line.startswith(("ScopeSpans", "InstrumentationScope")):
            section = ""
        elif stripped.startswith("-> "):
            key, _, value = stripped[3:].partition(": ")
            if section == "resource":
                resource[key] = _value(value)
            elif section == "attributes" and span is not None:
                span.attributes[key] = _value(value)
            elif section == "events" and span is not None and key == "Name":
                span.events.append(value)
            elif section == "links" and span is not None and key == "Trace ID":
                span.links.append((value, ""))
            elif section == "links" and span is not None and key == "ID":
                span.links[-1] = (span.links[-1][0], value)
        elif section == "span" and span is not None and ":" in stripped:
            key, _, value = (part.strip() for part in stripped.partition(":"))
            if key in _FIELDS:
                setattr(span, _FIELDS[key], value)
    return spans


class Collector:
    """``otelcol-tokenwire`` receiving OTLP/gRPC on ``endpoint``, printing what it gets."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self._binary = binary
        self.port = _free_port()
        self._config = workdir / "otelcol.yaml"
        self._config.write_text(
            "receivers:\n  otlp:\n    protocols:\n      grpc:\n"
            f"        endpoint: 127.0.0.1:{self.port}\n"
            "exporters:\n  debug:\n    verbosity: detailed\n    use_internal_logger: false\n"
            "    sampling_initial: 1000000\n    sampling_thereafter: 1\n"
            "service:\n  telemetry:\n    metrics:\n      level: none\n"
            "  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n")
        self._proc: asyncio.subprocess.Process | None = None
        self._out: list[str] = []
        self._log: list[str] = []
        self._readers: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        """Everything the debug exporter printed so far."""
        return "".join(self._out)

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self._binary, "--config", str(self._config), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [asyncio.create_task(self._read(self._proc.stdout, self._out)),
                         asyncio.create_task(self._read(self._proc.stderr, self._log))]
        await self._until(lambda: "Everything is ready" in "".join(self._log), 60,
                          "the collector did not start")

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode("utf-8", "replace"))
            self._changed.set()

    async def _until(self, done: Callable[[], bool], within: float, what: str) -> None:
        """Returns once ``done()`` is true, checked whenever the collector prints; fails
        after ``within`` seconds, or when the collector exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not done():
            left = deadline - loop.time()
            if left <= 0 or (self._proc is not None and self._proc.returncode is not None):
                raise AssertionError(f"{what}; its log:\n{''.join(self._log)[-3000:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    async def spans(self, done: Callable[[list[Span]], bool], within: float = 30.0
                    ) -> list[Span]:
        """The spans received, once ``done`` says they are what the test waits for."""
        await self._until(lambda: done(parse(self.output)), within,
                          "the collector did not receive the spans awaited")
        return parse(self.output)

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        for reader in self._readers:
            await reader


@contextlib.asynccontextmanager
async def collector(workdir: Path) -> AsyncIterator[Collector]:
    running = Collector(collector_binary(), workdir)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()
