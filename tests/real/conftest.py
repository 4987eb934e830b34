"""The real tier: tokenwire against a real, pinned Ollama (v0.24.0) with a real model
(SmolLM2-135M), started once per session by ``scripts/ollama-dev`` on a port of its own with
``OLLAMA_NUM_PARALLEL=1``; for the OpenAI-compatible wire also llama.cpp's server (the one in
llama-cpp-python 0.3.36) with the same GGUF, started by ``scripts/llama-dev`` (``real_llama``).

The first run on a machine builds Ollama from source (minutes; progress is shown on the
terminal); later runs use the build cached in ``~/.cache/tokenwire``. This tier never skips: when
Ollama cannot be built or started every test in it errors with the script's output. Figures
measured by the tests (TTFT, tokens/s, load times, cancellation) are printed at the end of the
run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.conftest import runtimes
from tokenwire.service import Runtime, Settings
from tokenwire.v1 import generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
OLLAMA_DEV = ROOT / "scripts" / "ollama-dev"
LLAMA_DEV = ROOT / "scripts" / "llama-dev"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: llama-dev's context size (LLAMA_DEV_N_CTX default).
LLAMA_N_CTX = 2048
MODEL = "smollm2:135m"
OLLAMA_VERSION = "0.24.0"
#: A fresh machine builds Ollama from source first (about 4-10 minutes on 2 cores), or
#: llama-cpp-python (about 14 minutes on 2 shared cores).
START_TIMEOUT = 1800.0
STOP_TIMEOUT = 60.0

#: Gateway settings for this tier: the production timeouts (first token 300 s, idle 60 s),
#: because the point is to see them hold against a real model; ports are picked by the OS.
REAL = Settings(listen="127.0.0.1:0", health_interval=1.0, shutdown_grace=2.0)

#: name -> value, printed in the terminal summary (see pytest_terminal_summary).
FIGURES: dict[str, str] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("TOKENWIRE_CACHE") or Path.home() / ".cache" / "tokenwire")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_GO_UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GIN = re.compile(r"^\[GIN\] .*?\|\s*(\d{3})\s*\|\s*(\S+)\s*\|\s*\S+\s*\|\s*(\w+)\s+\"([^\"]+)\"")


def go_duration(text: str) -> float:
    """Seconds for a Go duration as gin prints it ("2m52s", "5.98s", "997.4ms")."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)([a-zµ]+)", text):
        total += float(number) * _GO_UNITS[unit]
    return total


@dataclass(frozen=True)
class GinLine:
    """One request line of Ollama's log: status, how long the handler ran, method, path."""

    status: int
    seconds: float
    method: str
    path: str


@dataclass(frozen=True)
class RealServer:
    """A real engine started for this tier: its URL, pid and log."""

    url: str
    port: int
    pid: int
    log: Path

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(cannot read {self.log}: {exc})"


@dataclass(frozen=True)
class RealOllama(RealServer):
    """The running real Ollama and what shows that it works (log, processes)."""

    def requests_since(self, offset: int) -> list[GinLine]:
        out = []
        for line in self.log_since(offset).splitlines():
            if m := _GIN.match(line):
                out.append(GinLine(int(m[1]), go_duration(m[2]), m[3], m[4]))
        return out

    def runner_pids(self) -> list[int]:
        """The `ollama runner` processes of this server (one per loaded model)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(fields[1]) == self.pid and b"runner" in cmdline[1:2]:
                pids.append(int(stat.parent.name))
        return pids

    @staticmethod
    def cpu_seconds(pids: list[int]) -> float:
        """CPU time (user + system) the processes have used so far."""
        ticks = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


def _run_streaming(cmd: list[str], env: dict[str, str], timeout: float,
                   show: Callable[[str], None]) -> tuple[int, str, str]:
    """Runs cmd, showing each stderr line as it comes; returns (code, stdout, stderr)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=ROOT) as proc:
        return _follow(proc, cmd, timeout, show)


def _follow(proc: subprocess.Popen[str], cmd: list[str], timeout: float,
            show: Callable[[str], None]) -> tuple[int, str, str]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                raise TimeoutError from None
            if line is None:
                break
            seen.append(line)
            show(line.rstrip("\n"))
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (TimeoutError, subprocess.TimeoutExpired):
        proc.terminate()  # ollama-dev's trap stops a build in progress
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise RuntimeError(
            f"{' '.join(cmd)} did not finish within {timeout:g}s; its output:\n" + "".join(seen)
        ) from None
    assert proc.stdout is not None
    out = proc.stdout.read()
    reader.join(timeout=5)
    return code, out, "".join(seen)


@contextlib.contextmanager
def started_ollama(show: Callable[[str], None], **env: str) -> Iterator[RealOllama]:
    """Builds (first run only) and starts the pinned Ollama on a free port, with
    ``OLLAMA_NUM_PARALLEL=1`` and the given extra environment; stops it on exit."""
    port = _free_port()
    env = {**os.environ, "OLLAMA_NUM_PARALLEL": "1", **env}
    cmd = [str(OLLAMA_DEV), "start", "--port", str(port)]
    stop = [str(OLLAMA_DEV), "stop", "--port", str(port)]
    settings = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("OLLAMA_"))
    show(f"$ {settings} {' '.join(cmd)} (a first run builds Ollama: minutes)")
    started = time.monotonic()
    try:
        code, out, err = _run_streaming(cmd, env, START_TIMEOUT, show)
        if code != 0 or f"OLLAMA_HOST=127.0.0.1:{port}" not in out:
            raise RuntimeError(
                f"the real tier needs a real Ollama, and `scripts/ollama-dev start` failed "
                f"(exit {code}). This tier never skips. stdout:\n{out}\nstderr:\n{err}"
            )
        FIGURES.setdefault("ollama-dev start", f"{time.monotonic() - started:.1f} s")
        ollama_dir = _cache_dir() / "ollama"
        pid = int((ollama_dir / f"serve-{port}.pid").read_text().strip())
        real = RealOllama(f"http://127.0.0.1:{port}", port, pid, ollama_dir / f"serve-{port}.log")
        version = httpx.get(real.url + "/api/version", timeout=10).json()["version"]
        assert version == OLLAMA_VERSION, f"expected the pinned Ollama {OLLAMA_VERSION}: {version}"
        yield real
    finally:
        # Always, even when start failed half-way: never leave a server behind.
        result = subprocess.run(stop, capture_output=True, text=True, timeout=STOP_TIMEOUT,
                                check=False, cwd=ROOT)
        for line in result.stderr.splitlines():
            show(line)


@dataclass(frozen=True)
class RealLlama(RealServer):
    """The running llama.cpp server (llama-cpp-python)."""


@contextlib.contextmanager
def started_llama(show: Callable[[str], None], **env: str) -> Iterator[RealLlama]:
    """Builds (first run only) and starts llama-cpp-python's server with smollm2:135m on a free
    port (``scripts/llama-dev start``), with the given extra environment; stops it on exit."""
    port = _free_port()
    env = {**os.environ, **env}
    cmd = [str(LLAMA_DEV), "start", "--port", str(port)]
    stop = [str(LLAMA_DEV), "stop", "--port", str(port)]
    show(f"$ {' '.join(cmd)} (a first run builds llama-cpp-python: about 15 minutes)")
    started = time.monotonic()
    try:
        code, out, err = _run_streaming(cmd, env, START_TIMEOUT, show)
        url = f"http://127.0.0.1:{port}"
        if code != 0 or f"LLAMA_URL={url}" not in out:
            raise RuntimeError(
                f"the real tier needs llama.cpp's server, and `scripts/llama-dev start` failed "
                f"(exit {code}). This tier never skips. stdout:\n{out}\nstderr:\n{err}"
            )
        FIGURES.setdefault("llama-dev start", f"{time.monotonic() - started:.1f} s")
        llama_dir = _cache_dir() / "llama"
        pid = int((llama_dir / f"serve-{port}.pid").read_text().strip())
        real = RealLlama(url, port, pid, llama_dir / f"serve-{port}.log")
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [MODEL], models
        yield real
    finally:
        result = subprocess.run(stop, capture_output=True, text=True, timeout=STOP_TIMEOUT,
                                check=False, cwd=ROOT)
        for line in result.stderr.splitlines():
            show(line)


def shower(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Prints a line of the real tier's progress on the terminal, past pytest's capture."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def show(line: str) -> None:
        ctx = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with ctx:
            print(f"[real tier] {line}", file=sys.stderr, flush=True)

    return show


@pytest.fixture(scope="package")
def real_ollama(request: pytest.FixtureRequest) -> Iterator[RealOllama]:
    """Builds (first run only) and starts the pinned Ollama; stops it after this tier."""
    with started_ollama(shower(request)) as real:
        yield real


@pytest.fixture(scope="package")
def real_llama(request: pytest.FixtureRequest) -> Iterator[RealLlama]:
    """Builds (first run only) and starts llama.cpp's server; stops it after this tier."""
    with started_llama(shower(request)) as real:
        yield real


@pytest.fixture
def figures() -> dict[str, str]:
    """Measured figures, printed at the end of the run."""
    return FIGURES


MakeRuntime = Callable[..., Awaitable[Runtime]]


@pytest.fixture
async def make_real_runtime(real_ollama: RealOllama) -> AsyncIterator[MakeRuntime]:
    """Builds in-process gateways (in the test's loop) pointed at the real Ollama."""
    async with runtimes(replace(REAL, ollama_url=real_ollama.url)) as make:
        yield make


@pytest.fixture
async def real_runtime(make_real_runtime: MakeRuntime) -> Runtime:
    return await make_real_runtime()


@pytest.fixture
async def real_stub(
    real_runtime: Runtime,
) -> AsyncIterator[generation_pb2_grpc.GenerationServiceStub]:
    async with grpc.aio.insecure_channel(real_runtime.target) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture
async def ollama_http(real_ollama: RealOllama) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client for Ollama itself (direct comparisons, unloading)."""
    async with httpx.AsyncClient(base_url=real_ollama.url, timeout=120.0) as client:
        yield client


@pytest.fixture(scope="session")
def tool_bin() -> Path:
    """The pinned grpcurl (scripts/tools installs it on first use); never skipped."""
    result = subprocess.run([str(ROOT / "scripts" / "tools")], capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, f"scripts/tools failed:\n{result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


# -- hooks ---------------------------------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The test that first needs Ollama (or llama.cpp's server) also waits for its build:
    give it that time."""
    for fixture in ("real_ollama", "real_llama"):
        for item in items:
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.timeout(START_TIMEOUT + 300))
                break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    real = getattr(item, "funcargs", {}).get("real_ollama")
    if report.failed and isinstance(real, RealOllama):
        report.sections.append((f"Ollama log (tail of {real.log})", real.log_tail()))
    llama = getattr(item, "funcargs", {}).get("real_llama")
    if report.failed and isinstance(llama, RealLlama):
        report.sections.append((f"llama.cpp server log (tail of {llama.log})", llama.log_tail()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.write_sep("-", "real Ollama figures (this run)")
        width = max(len(name) for name in FIGURES)
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name:<{width}}  {value}")
