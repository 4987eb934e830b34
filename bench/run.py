"""Runs the tokenwire benchmark suite and prints its figures (see bench/README.md).

Started by ``scripts/bench``, which builds the Go programs first. Everything runs on this
machine against 127.0.0.1, in one run, so that every comparison is a ratio of figures taken
minutes apart on the same cores:

- the Go upstream (``bench/upstream``): Ollama-compatible NDJSON, zero delay or 30 tokens/s;
- path A: readers straight to the upstream (the floor);
- path B: the FastAPI + SSE peer (``bench/peer_fastapi.py``);
- path C: ``tokenwire-server``;
- path P: nginx as a plain reverse proxy of the upstream (byte forwarding: the floor of a
  proxy), when ``--nginx`` names its binary (``scripts/bench`` installs Debian's nginx-light);
- path O: ``tokenwire-server`` from another git revision (``--baseline REV``), for the
  side-by-side check that a change keeps the figures of the code before it.

Each path is read by a Python reader (``bench/pyload.py``: httpx for A and B, the tokenwire
``AsyncClient`` for C) and by the compiled reader (``bench/loadgen``), each in its own
process, so that server CPU is accounted per process and the compiled reader shows what a
server can do when its reader is not the limit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procstat import cpu_ticks  # bench/ is on sys.path: these run as scripts

from tokenwire._server_entry import GRPC_EXPERIMENTS_DEFAULT

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PACE_US = 1e6 / 30  # 30 tokens/s

READERS = (  # (key, path, reader, proto)
    ("A.py", "A", "py", "ndjson"),
    ("A.go", "A", "go", "ndjson"),
    ("B.py", "B", "py", "sse"),
    ("B.go", "B", "go", "sse"),
    ("C.py", "C", "py", "grpc"),
    ("C.go", "C", "go", "grpc"),
)
CURVE_STREAMS = (250, 500, 750)  # the curve phase, 30 tokens/s each (1000: the paced phase)
#: Path G, 1000 × 30 only: bench/floor_grpc.py, a grpc.aio server that writes timed tokens
#: with no upstream: the floor of one Python grpc.aio process.
FLOOR_READER = ("G.go", "G", "go", "grpc")
#: The balancer phase: D, one replica read directly; L, HAProxy (deploy/haproxy.cfg) in front
#: of three replicas (D's among them); S, a second HAProxy with D's replica as its only one.
#: The hot-path phase (issue #14): P, nginx in front of the upstream (read like A); O, the
#: baseline revision's tokenwire (read like C).
PROXY_READER = ("P.go", "P", "go", "ndjson")
BASELINE_READER = ("O.go", "O", "go", "grpc")
#: Path F: bench/floorgo, grpc-go writing timed tokens with no upstream: the floor of a
#: compiled gRPC server, beside G's grpc.aio floor.
GO_FLOOR_READER = ("F.go", "F", "go", "grpc")
#: Streams of the hot-path phase's paced comparison (30 tokens/s each).
HOTPATH_STREAMS = 300
BALANCER_READERS = (("D.go", "D", "go", "grpc"), ("R.go", "R", "go", "grpc"),
                    ("L.go", "L", "go", "grpc"), ("S.go", "S", "go", "grpc"))
PATH_NAMES = {
    "A": "A: httpx → upstream (floor)",
    "B": "B: FastAPI SSE peer",
    "C": "C: tokenwire",
}


@dataclass
class Sizes:
    single_tokens: int
    single_window: float
    levels: tuple[int, ...]
    agg_tokens: int
    warmup: float
    warmup_1000: float
    window: float
    ttft_requests: int
    ttft_warmup: int
    cancel_requests: int
    cancel_warmup: int
    paced_ramp: float
    paced_warmup: float
    paced_window: float
    hotpath_rounds: int


FULL = Sizes(single_tokens=2000, single_window=4, levels=(10, 100, 1000), agg_tokens=256,
             warmup=2, warmup_1000=6, window=5, ttft_requests=200, ttft_warmup=20,
             cancel_requests=100, cancel_warmup=10, paced_ramp=2, paced_warmup=3,
             paced_window=10, hotpath_rounds=3)
QUICK = Sizes(single_tokens=1000, single_window=1.5, levels=(10, 100, 1000), agg_tokens=256,
              warmup=0.5, warmup_1000=3, window=1.5, ttft_requests=60, ttft_warmup=10,
              cancel_requests=20, cancel_warmup=5, paced_ramp=1, paced_warmup=1.5,
              paced_window=3, hotpath_rounds=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited early (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not listen on 127.0.0.1:{port} in {timeout:g}s")


def machine_busy_ticks() -> int:
    """Non-idle CPU time of the whole machine, in clock ticks (first line of /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def proc_status(pid: int, key: str) -> int:
    """A kB figure from /proc/<pid>/status (VmRSS, VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Samples VmRSS of one process every 100 ms; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.1):
            self.peak_kb = max(self.peak_kb, proc_status(self.pid, "VmRSS"))

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak_kb


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    starts: int = field(default=0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.bin = Path(args.bin_dir)
        self.py = sys.executable
        self.logs = Path(args.log_dir)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.servers: dict[str, Server] = {}
        self.results: dict[str, Any] = {"phases": {}}
        self.upstream_url = ""
        self._gateway_argv: list[str] = []

    # -- processes ---------------------------------------------------------------------

    def start(self, server: Server) -> None:
        server.port = server.port or free_port()
        server.starts += 1
        server.log = self.logs / f"{server.name}.log"
        argv = [a.replace("{port}", str(server.port)) for a in server.argv]
        log = open(server.log, "ab")  # noqa: SIM115 - lives as long as the process
        server.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       env=server.env, cwd=ROOT, start_new_session=True)
        wait_port(server.port, server.proc, server.name)
        self.servers[server.name] = server

    def stop(self, server: Server) -> None:
        if server.proc is None or server.proc.poll() is not None:
            return
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()

    def restart(self, name: str) -> None:
        server = self.servers[name]
        self.stop(server)
        self.start(server)
        time.sleep(0.5)

    def start_all(self) -> None:
        env = dict(os.environ)
        for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                    "ALL_PROXY"):
            env.pop(key, None)
        upstream = Server("upstream", [str(self.bin / "upstream"), "-listen",
                                       "127.0.0.1:{port}"], env)
        self.start(upstream)
        self.upstream_url = f"http://127.0.0.1:{upstream.port}"
        peer = Server("peer", [self.py, str(BENCH / "peer_fastapi.py"), "--listen",
                               "127.0.0.1:{port}", "--ollama-url", self.upstream_url], env)
        self.start(peer)
        gw_env = dict(env)
        if self.args.server_pythonpath:
            gw_env["PYTHONPATH"] = os.pathsep.join(
                [self.args.server_pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        # Limits raised above the 1000 streams of one reader (one caller, one connection):
        # the admission default (256 per caller) refuses them by design, and an HTTP/2 limit
        # of exactly 1000 makes the server refuse (REFUSED_STREAM) a new stream that a client
        # opens as soon as an old one ended, before the server released it. Everything else
        # is default.
        gateway = Server("gateway", [self.args.server_cmd, "--listen", "127.0.0.1:{port}",
                                     "--ollama-url", self.upstream_url,
                                     "--max-streams", "4096", "--max-streams-per-caller", "4096",
                                     "--max-concurrent-streams", "2048",
                                     *self.args.server_arg], gw_env)
        self.start(gateway)
        # The grpc.aio floor runs with the gRPC settings tokenwire-server makes by default.
        floor_env = {"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS_DEFAULT, **env}
        self.start(Server("floor", [self.py, str(BENCH / "floor_grpc.py"), "--listen",
                                    "127.0.0.1:{port}"], floor_env))
        self.start(Server("gofloor", [str(self.bin / "floorgo"), "-listen", "127.0.0.1:{port}"],
                          env))
        if self.args.nginx:
            self.start(self._nginx(env))
        if self.args.baseline:
            old = self._baseline_tree()
            base_env = dict(gw_env)
            base_env["PYTHONPATH"] = os.pathsep.join(  # its protos' generated code too
                [str(old / "service"), str(old / "client"),
                 env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            # grpcio's own defaults, as before tokenwire-server chose its GRPC_EXPERIMENTS
            # (so `--baseline HEAD` measures that choice alone).
            base_env["GRPC_EXPERIMENTS"] = ""
            self.start(Server("baseline", [self.args.server_cmd, *gateway.argv[1:]], base_env))
        time.sleep(1.0)  # first health probe done, caches warm

    def _nginx(self, env: dict[str, str]) -> Server:
        """Path P: nginx as a plain HTTP/1.1 reverse proxy of the upstream, unbuffered (each
        chunk is forwarded as it arrives), keep-alive to the upstream, one process (no
        master), no access log: the least a proxy does per token."""
        port = free_port()
        home = self.logs / "nginx"
        home.mkdir(parents=True, exist_ok=True)
        upstream = self.upstream_url.removeprefix("http://")
        temps = "\n".join(f"  {k}_temp_path {home}/{k};"
                          for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (home / "nginx.conf").write_text(f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
{temps}
  upstream engine {{ server {upstream}; keepalive 2048; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 360s;
    }}
  }}
}}
""")
        return Server("proxy", [self.args.nginx, "-p", str(home), "-e", str(home / "error.log"),
                                "-c", str(home / "nginx.conf")], env, port=port)

    def _baseline_tree(self) -> Path:
        """``service/`` and ``client/`` of the baseline revision, exported from git into the
        log dir."""
        out = self.logs / "baseline"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", self.args.baseline, "service", "client"],
                                 cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        return out

    def stop_all(self) -> None:
        for server in reversed(list(self.servers.values())):
            self.stop(server)

    def target(self, path: str) -> tuple[str, int]:
        """(host:port, server pid) for a path; A has no server in between."""
        if path == "R":  # the balancer phase's three replicas, each read directly
            replicas = [self.servers[f"replica{n}"] for n in (1, 2, 3)]
            return ",".join(f"127.0.0.1:{r.port}" for r in replicas), replicas[0].pid
        name = {"A": "upstream", "B": "peer", "C": "gateway", "G": "floor", "D": "replica1",
                "L": "balancer", "S": "balancer1", "P": "proxy", "O": "baseline",
                "F": "gofloor"}[path]
        server = self.servers[name]
        return f"127.0.0.1:{server.port}", (server.pid if path != "A" else 0)

    def upstream_active(self) -> int:
        with urllib.request.urlopen(f"{self.upstream_url}/stats?prefix=-none-", timeout=5) as r:
            return int(json.load(r)["active"])

    def settle(self, timeout: float = 30) -> float:
        """Waits until the previous run is over: no open upstream stream and our servers
        idle. Returns the CPU share (in cores) that processes other than ours used while
        idle: anything else running on this machine skews every figure."""
        deadline = time.monotonic() + timeout
        pids = [s.pid for s in self.servers.values() if s.proc and s.proc.poll() is None]
        while time.monotonic() < deadline:
            ours0, busy0, t0 = sum(map(cpu_ticks, pids)), machine_busy_ticks(), time.monotonic()
            time.sleep(0.3)
            ours1, busy1, t1 = sum(map(cpu_ticks, pids)), machine_busy_ticks(), time.monotonic()
            if ours1 - ours0 <= 0.05 * CLK_TCK * (t1 - t0) and self.upstream_active() == 0:
                return max(0.0, (busy1 - busy0 - (ours1 - ours0)) / CLK_TCK / (t1 - t0))
        self.log("warning: servers still busy after the previous run")
        return -1.0

    def read(self, key: str, mode: str, *, settled: bool = False,
             **flags: Any) -> dict[str, Any]:
        """Runs one reader process and returns its JSON figures (``settled``: the caller
        waited for the servers to be idle already)."""
        _, path, reader, proto = next(r for r in (*READERS, FLOOR_READER, PROXY_READER,
                                                  BASELINE_READER, GO_FLOOR_READER,
                                                  *BALANCER_READERS)
                                      if r[0] == key)
        target, pid = self.target(path)
        opts = {"mode": mode, "proto": proto, "target": target, "server-pid": pid, **flags}
        if reader == "go":
            argv = [str(self.bin / "loadgen")]
            argv += [f"-{k.replace('_', '-')}={v}" for k, v in opts.items()]
        else:
            argv = [self.py, str(BENCH / "pyload.py")]
            argv += [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
        budget = (float(flags.get("warmup", 0)) + float(flags.get("window", 0))
                  + float(flags.get("ramp", 0)) + 120)
        background = 0.0 if settled else self.settle()
        if background > 0.15:
            self.log(f"warning: other processes are using {background:.2f} cores; "
                     "figures of this run are skewed")
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=budget, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"bench: reader {key} {mode} failed:\n{done.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        out["wall_s"] = round(time.monotonic() - started, 2)
        out["background_cores"] = round(background, 3)
        if done.stderr.strip():
            out["stderr"] = done.stderr.strip()[-500:]
        return out

    # -- phases --------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def phase_throughput(self) -> None:
        s = self.sizes
        runs: dict[str, Any] = {}
        plan = [("single", 1, s.single_tokens, s.warmup, s.single_window)]
        plan += [(f"c{n}", n, s.agg_tokens, s.warmup_1000 if n >= 1000 else s.warmup, s.window)
                 for n in s.levels]
        for label, streams, tokens, warmup, window in plan:
            for key, *_ in READERS:
                if self.args.quick and key == "A.py" and streams >= 1000:
                    continue  # httpx itself needs ~30 s to run 1000 streams; full runs only
                self.log(f"zero delay, {streams} stream(s), {key}")
                out = self.read(key, "throughput", streams=streams, tokens=tokens,
                                warmup=warmup, window=window)
                runs.setdefault(label, {})[key] = out
                self.log(f"  {out['tokens_per_s']:,.0f} tokens/s, errors {out['errors']}")
        self.results["phases"]["zero_delay"] = runs

    def phase_ttft(self) -> None:
        s = self.sizes
        runs = {}
        for key, *_ in READERS:
            self.log(f"time to first token, {key}")
            runs[key] = self.read(key, "ttft", tokens=8, requests=s.ttft_requests,
                                  warmup_requests=s.ttft_warmup)
        self.results["phases"]["ttft"] = runs

    def phase_cancel(self) -> None:
        s = self.sizes
        runs = {}
        for key, *_ in READERS:
            self.log(f"cancel → upstream close, {key}")
            runs[key] = self.read(key, "cancel", tokens=100000, interval_us=f"{PACE_US:.3f}",
                                  cancel_after=3, requests=s.cancel_requests,
                                  warmup_requests=s.cancel_warmup,
                                  stats_url=f"{self.upstream_url}/stats",
                                  id_prefix=f"cancel{key.replace('.', '')}{int(time.time())}")
        self.results["phases"]["cancel"] = runs

    def read_paced(self, key: str, streams: int, window: float, **flags: Any) -> dict[str, Any]:
        """One run of ``streams`` streams at 30 tokens/s, logged as it ends."""
        s = self.sizes
        tokens = math.ceil(30 * (s.paced_ramp + s.paced_warmup + window + 3))
        out = self.read(key, "throughput", streams=streams, tokens=tokens,
                        interval_us=f"{PACE_US:.3f}", ramp=s.paced_ramp,
                        warmup=s.paced_warmup, window=window, **flags)
        lat = out.get("latency_ns", {})
        self.log(f"  {out['tokens_per_s']:,.0f} tokens/s, errors {out['errors']}, latency "
                 f"p50 {lat.get('p50', 0) / 1e6:.2f} ms p99 {lat.get('p99', 0) / 1e6:.2f} ms")
        return out

    def phase_paced(self) -> None:
        """1000 streams × 30 tokens/s on fresh server processes: latency, errors, CPU, RSS."""
        runs = {}
        for key, path, _, _ in (*READERS, FLOOR_READER):
            name = {"B": "peer", "C": "gateway", "G": "floor"}.get(path)
            sampler = None
            if name:
                self.restart(name)
                rss_idle = proc_status(self.servers[name].pid, "VmRSS")
                sampler = RssSampler(self.servers[name].pid)
                sampler.start()
            self.log(f"1000 streams × 30 tokens/s, {key}")
            out = self.read_paced(key, 1000, self.sizes.paced_window)
            if name and sampler:
                out["rss_idle_kb"] = rss_idle
                out["rss_peak_sampled_kb"] = sampler.stop()
                out["vm_hwm_kb"] = proc_status(self.servers[name].pid, "VmHWM")
            runs[key] = out
        self.results["phases"]["paced_1000x30"] = runs

    def phase_hotpath(self) -> None:
        """Issue #14: the per-token path at a realistic pace, against a byte-forwarding proxy.

        1. 300 streams × 30 tokens/s, Go reader: A (direct), P (nginx), C (tokenwire), G
           (the grpc.aio floor), F (the grpc-go floor) and O (the baseline revision, with
           --baseline), in alternating rounds; the median round of each by CPU stands.
        2. 1000 streams × 30 tokens/s, once each: A, P and C.
        3. Time to first token, Go reader: A, C (and O).
        4. Zero delay, C against O, single stream and 100 streams, alternating rounds."""
        s = self.sizes
        keys = ["A.go", "P.go", "C.go", "G.go", "F.go"]
        if "proxy" not in self.servers:
            self.log("no nginx (--nginx): the hot-path phase has no proxy floor P")
            keys.remove("P.go")
        baseline = "baseline" in self.servers
        if baseline:
            keys.append("O.go")
        rounds: dict[str, list[dict[str, Any]]] = {}
        window = min(s.paced_window, 5.0)
        for n in range(s.hotpath_rounds):
            for key in keys if n % 2 == 0 else reversed(keys):
                self.log(f"{HOTPATH_STREAMS} streams × 30 tokens/s, {key}, round {n + 1}")
                rounds.setdefault(key, []).append(self.read_paced(key, HOTPATH_STREAMS, window))
        runs: dict[str, Any] = {"paced": {key: _median_round(key, outs)
                                          for key, outs in rounds.items()},
                                "paced_rounds": rounds}
        for key in [k for k in ("A.go", "P.go", "C.go") if k in keys]:
            self.log(f"1000 streams × 30 tokens/s, {key}")
            runs.setdefault("paced_1000", {})[key] = self.read_paced(key, 1000, s.paced_window)
        for key in ("A.go", "C.go", "O.go") if baseline else ("A.go", "C.go"):
            self.log(f"time to first token, {key}")
            runs.setdefault("ttft", {})[key] = self.read(key, "ttft", tokens=8,
                                                         requests=s.ttft_requests,
                                                         warmup_requests=s.ttft_warmup)
        if baseline:
            zero: dict[str, dict[str, list[dict[str, Any]]]] = {}
            for n in range(s.hotpath_rounds):
                for label, streams, tokens in (("single", 1, s.single_tokens),
                                               ("c100", 100, s.agg_tokens)):
                    for key in ("C.go", "O.go") if n % 2 == 0 else ("O.go", "C.go"):
                        self.log(f"zero delay, {streams} stream(s), {key}, round {n + 1}")
                        out = self.read(key, "throughput", streams=streams, tokens=tokens,
                                        warmup=s.warmup, window=s.window)
                        self.log(f"  {out['tokens_per_s']:,.0f} tokens/s, errors {out['errors']}")
                        zero.setdefault(label, {}).setdefault(key, []).append(out)
            runs["zero"] = {label: {key: sorted(outs, key=lambda o: o["tokens_per_s"])[
                len(outs) // 2] for key, outs in by_key.items()} for label, by_key in zero.items()}
            runs["baseline"] = self.args.baseline
        self.results["phases"]["hotpath"] = runs

    def phase_curve(self) -> None:
        """Latency against load at 30 tokens/s per stream, compiled reader: where each
        server's event loop saturates on this machine."""
        runs: dict[str, Any] = {}
        window = min(self.sizes.paced_window, 5.0)
        for streams in CURVE_STREAMS:
            for key in ("B.go", "C.go", "G.go"):
                self.log(f"{streams} streams × 30 tokens/s, {key}")
                runs.setdefault(str(streams), {})[key] = self.read_paced(key, streams, window)
        self.results["phases"]["curve"] = runs

    def phase_workers(self) -> None:
        """``--workers`` scaling, compiled reader over 8 connections: the kernel spreads
        connections (not streams) over the workers, so one connection would use one."""
        s = self.sizes
        gateway = self.servers["gateway"]
        argv = list(gateway.argv)
        counts = sorted({1, 2, min(len(os.sched_getaffinity(0)), 4)})
        runs: dict[str, Any] = {}
        try:
            for n in counts:
                gateway.argv = [*argv, f"--workers={n}"]
                self.restart("gateway")
                time.sleep(1.0)  # every worker up, not only the first to listen
                self.log(f"--workers {n}: zero delay, 100 streams, 8 connections, C.go")
                zero = self.read("C.go", "throughput", streams=100, tokens=s.agg_tokens,
                                 warmup=s.warmup, window=s.window, conns=8)
                self.log(f"  {zero['tokens_per_s']:,.0f} tokens/s")
                self.log(f"--workers {n}: 1000 streams × 30 tokens/s, 8 connections, C.go")
                paced = self.read_paced("C.go", 1000, s.paced_window, conns=8)
                runs[str(n)] = {"zero_c100": zero, "paced_1000x30": paced}
        finally:
            gateway.argv = argv
            self.restart("gateway")
        self.results["phases"]["workers"] = runs

    def _upstreams_file(self, name: str, tables: list[tuple[str, str, str]]) -> Path:
        """An upstreams file of (name, kind, url) tables that serve every model."""
        path = self.logs / f"{name}.toml"
        path.write_text("".join(
            f'[upstreams.{up}]\nkind = "{kind}"\nurl = "{url}"\nmodels = ["*"]\n'
            f"slots = 4096\npriority = {i if name == 'failover' else 0}\n\n"
            for i, (up, kind, url) in enumerate(tables)))
        return path

    def _gateway_with(self, *extra: str) -> None:
        """Restarts the gateway with the upstreams (or flags) given instead of --ollama-url."""
        gateway = self.servers["gateway"]
        base = list(self._gateway_argv)
        i = base.index("--ollama-url")
        del base[i:i + 2]
        gateway.argv = [*base, *extra]
        self.restart("gateway")
        time.sleep(1.0)  # the first health probe of every upstream is done

    def _calls(self, n: int, rounds: int) -> list[float]:
        """Gateway CPU µs per call over ``n`` sequential one-token calls, per round."""
        pid = self.servers["gateway"].pid
        per_call = []
        for _ in range(rounds):
            self.settle()  # start-up work (probes of every upstream) is not the calls'
            before = cpu_ticks(pid)
            self.read("C.go", "ttft", tokens=1, requests=n, warmup_requests=0, settled=True)
            per_call.append((cpu_ticks(pid) - before) / CLK_TCK / n * 1e6)
        return per_call

    def phase_backends(self) -> None:
        """Issue #11's figures, each pair measured back to back on restarted gateways:
        the OpenAI SSE path against the Ollama NDJSON path (zero delay, 100 streams, CPU
        per token); routing over 4 upstreams against one (gateway CPU per call); the
        first-token delay of a call that fails over from a refused upstream."""
        s = self.sizes
        self._gateway_argv = list(self.servers["gateway"].argv)
        up = self.upstream_url
        runs: dict[str, Any] = {}
        try:
            openai = self._upstreams_file("openai", [("sse", "openai", up + "/v1")])
            for label, extra in (("ollama", ["--ollama-url", up]),
                                 ("openai", ["--upstreams-file", str(openai)])) * (
                                     2 if self.args.quick else 3):
                self._gateway_with(*extra)
                self.log(f"backend {label}: zero delay, 100 streams, C.go")
                out = self.read("C.go", "throughput", streams=100, tokens=s.agg_tokens,
                                warmup=s.warmup, window=s.window)
                runs.setdefault("wire_rounds", {}).setdefault(label, []).append(out)
                self.log(f"  {out['tokens_per_s']:,.0f} tokens/s")
            # Each engine's median round (by CPU per token) stands for it.
            runs["wire"] = {label: sorted(rounds, key=lambda r: r["server_cpu_ticks"]
                                          / max(r["tokens"], 1))[len(rounds) // 2]
                            for label, rounds in runs["wire_rounds"].items()}
            calls, rounds = (800, 3) if self.args.quick else (2000, 5)
            one = self._upstreams_file("one", [("u0", "ollama", up)])
            four = self._upstreams_file("four", [(f"u{i}", "ollama", up) for i in range(4)])
            for label, path in (("1 upstream", one), ("4 upstreams", four)) * rounds:
                self._gateway_with("--upstreams-file", str(path))
                self.log(f"routing, {label}: {calls} sequential calls, C.go")
                runs.setdefault("routing", {}).setdefault(label, []).extend(
                    self._calls(calls, 1))
            # The routing code alone, in one process (bench/routing.py): what the
            # end-to-end difference above, a few µs in about a millisecond, cannot resolve.
            micro = subprocess.run([self.py, str(BENCH / "routing.py"), "--json"],
                                   capture_output=True, text=True, check=True, cwd=ROOT)
            runs["routing_alone"] = json.loads(micro.stdout.strip().splitlines()[-1])
            # Failover: the preferred upstream refuses connections (it answered the last
            # health probe, then went away; the next probe is far off); the circuit breaker
            # is off, so every call tries it first and moves on.
            gone = Server("gone", [str(self.bin / "upstream"), "-listen", "127.0.0.1:{port}"],
                          dict(os.environ))
            self.start(gone)
            failover = self._upstreams_file(
                "failover", [("gone", "ollama", f"http://127.0.0.1:{gone.port}"),
                             ("live", "ollama", up)])
            for label, extra in (("direct", ["--ollama-url", up]),
                                 ("failover", ["--upstreams-file", str(failover),
                                               "--breaker-threshold", "0",
                                               "--health-interval", "600"])):
                self._gateway_with(*extra)
                if label == "failover":
                    self.stop(gone)
                    del self.servers["gone"]
                self.log(f"time to first token, {label}, C.go")
                runs.setdefault("failover", {})[label] = self.read(
                    "C.go", "ttft", tokens=8, requests=s.ttft_requests,
                    warmup_requests=s.ttft_warmup)
        finally:
            self.servers["gateway"].argv = self._gateway_argv
            self.restart("gateway")
        self.results["phases"]["backends"] = runs

    def _start_redis(self) -> tuple[Server, str]:
        """A redis-server (Debian's, installed if missing) on a free port, no persistence."""
        redis_bin = subprocess.run(
            [str(ROOT / "scripts" / "debian-tools"), "redis-server"], check=True,
            capture_output=True, text=True).stdout.strip().splitlines()[-1]
        redis = Server("redis", [redis_bin, "--port", "{port}", "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no"], dict(os.environ))
        self.start(redis)
        return redis, f"redis://127.0.0.1:{redis.port}/0"

    def phase_resume(self) -> None:
        """Issue #12's figures, Python reader, back to back: CPU per token of resumable
        streams in memory and mirrored to Redis against plain ones (zero delay, 100
        streams; alternating rounds, the median of each stands; with Redis, the gateway's
        CPU and redis-server's beside it); time to first token of plain and resumable
        starts; a Resume's first replayed token (memory)."""
        s = self.sizes
        self._gateway_argv = list(self.servers["gateway"].argv)
        redis, redis_url = self._start_redis()
        runs: dict[str, Any] = {}
        try:
            for label, resumable, extra in (("plain", "false", ()),
                                            ("resumable", "true", ()),
                                            ("redis", "true", ("--redis-url", redis_url))) * 3:
                gateway = self.servers["gateway"]
                gateway.argv = [*self._gateway_argv, *extra]
                self.restart("gateway")
                self.log(f"{label}: zero delay, 100 streams, C.py")
                self.settle()
                redis_before = cpu_ticks(redis.pid)
                out = self.read("C.py", "throughput", streams=100, tokens=s.agg_tokens,
                                warmup=s.warmup, window=s.window, resumable=resumable,
                                settled=True)
                # redis-server's CPU over the whole run (warm-up included): an upper bound.
                out["redis_cpu_ticks"] = cpu_ticks(redis.pid) - redis_before
                runs.setdefault("cpu_rounds", {}).setdefault(label, []).append(out)
                self.log(f"  {out['tokens_per_s']:,.0f} tokens/s")
            runs["cpu"] = {label: sorted(rounds, key=lambda r: r["server_cpu_ticks"]
                                         / max(r["tokens"], 1))[len(rounds) // 2]
                           for label, rounds in runs["cpu_rounds"].items()}
            self.servers["gateway"].argv = self._gateway_argv
            self.restart("gateway")
            for label, resumable in (("plain", "false"), ("resumable", "true")):
                self.log(f"time to first token, {label}, C.py")
                runs.setdefault("ttft", {})[label] = self.read(
                    "C.py", "ttft", tokens=8, requests=s.ttft_requests,
                    warmup_requests=s.ttft_warmup, resumable=resumable)
            self.log("Resume: first replayed token, C.py")
            runs["replay"] = self.read("C.py", "resume", tokens=64, requests=s.ttft_requests,
                                       warmup_requests=s.ttft_warmup, resumable="true")
        finally:
            self.servers["gateway"].argv = self._gateway_argv
            self.restart("gateway")
            self.stop(redis)
            del self.servers["redis"]
        self.results["phases"]["resume"] = runs

    def phase_limits(self) -> None:
        """Issue #13's admission figures, Python reader: the gateway's CPU per call and
        time to first token with admission limits and a token budget kept in this process
        against the same ones shared in Redis (calls of 4 tokens, 100 at a time, so the
        per-call cost dominates; alternating rounds, 3 with --quick and 5 without, the
        median of each stands)."""
        s = self.sizes
        self._gateway_argv = list(self.servers["gateway"].argv)
        redis, redis_url = self._start_redis()
        callers = Path(tempfile.mkdtemp(prefix="tokenwire-bench-")) / "callers.toml"
        # Limits that every call passes and none reaches: the cost of checking them.
        callers.write_text('[callers.bench]\ntoken = "bench-token"\nmax_streams = 4096\n'
                           "rate = 1000000.0\nburst = 1000000\n"
                           "tokens_per_minute = 1000000000\ntokens_per_day = 100000000000\n")
        common = ("--callers-file", str(callers), "--rate", "1000000")
        runs: dict[str, Any] = {}
        try:
            for label, extra in (("local", common),
                                 ("redis", (*common, "--redis-url", redis_url))) * (
                                     3 if self.args.quick else 5):
                self.servers["gateway"].argv = [*self._gateway_argv, *extra]
                self.restart("gateway")
                self.log(f"{label}: calls of 4 tokens, 100 at a time, C.py")
                self.settle()
                redis_before = cpu_ticks(redis.pid)
                out = self.read("C.py", "throughput", streams=100, tokens=4,
                                warmup=s.warmup, window=s.window, token="bench-token",
                                settled=True)
                out["redis_cpu_ticks"] = cpu_ticks(redis.pid) - redis_before
                runs.setdefault("cpu_rounds", {}).setdefault(label, []).append(out)
                self.log(f"  {out['streams_completed_in_window'] / out['window_s']:,.0f} "
                         "calls/s")
                ttft = self.read("C.py", "ttft", tokens=8, requests=s.ttft_requests,
                                 warmup_requests=s.ttft_warmup, token="bench-token")
                runs.setdefault("ttft_rounds", {}).setdefault(label, []).append(ttft)
            runs["cpu"] = {label: sorted(rounds, key=lambda r: r["server_cpu_ticks"] / max(
                r["streams_completed_in_window"], 1))[len(rounds) // 2]
                for label, rounds in runs["cpu_rounds"].items()}
            runs["ttft"] = {label: sorted(rounds, key=lambda r: r["ttft_ns"]["p50"])[
                len(rounds) // 2] for label, rounds in runs["ttft_rounds"].items()}
        finally:
            self.servers["gateway"].argv = self._gateway_argv
            self.restart("gateway")
            self.stop(redis)
            del self.servers["redis"]
        self.results["phases"]["limits"] = runs

    def phase_headers(self) -> None:
        """Issue #13: time to first token of the two --initial-metadata orders, headers with
        the first Token (which lets a client retry a call that failed before it) against
        headers while the upstream request is made, with the Go and the Python reader
        (alternating rounds, gateway restarted each time, the median of each stands)."""
        s = self.sizes
        self._gateway_argv = list(self.servers["gateway"].argv)
        runs: dict[str, Any] = {}
        try:
            for order in ("first-token", "early") * 3:
                self.servers["gateway"].argv = [*self._gateway_argv, "--initial-metadata",
                                                order]
                self.restart("gateway")
                for key in ("C.go", "C.py"):
                    self.log(f"time to first token, --initial-metadata {order}, {key}")
                    out = self.read(key, "ttft", tokens=8, requests=s.ttft_requests,
                                    warmup_requests=s.ttft_warmup)
                    runs.setdefault("rounds", {}).setdefault(key, {}).setdefault(
                        order, []).append(out)
            runs["ttft"] = {key: {order: sorted(rounds, key=lambda r: r["ttft_ns"]["p50"])[
                len(rounds) // 2] for order, rounds in by_order.items()}
                for key, by_order in runs["rounds"].items()}
        finally:
            self.servers["gateway"].argv = self._gateway_argv
            self.restart("gateway")
        self.results["phases"]["headers"] = runs

    def phase_balancer(self) -> None:
        """Issue #13's balancer figures, compiled reader: the same paced load (300 streams
        × 30 tokens/s over 4 connections; HAProxy's default of 100 streams per client
        connection) and a TTFT series, read from one replica directly (D), from the three
        replicas directly (R: one connection to each, as a client's round-robin channel
        keeps, 100 streams on each), through HAProxy running deploy/haproxy.cfg in front
        of the three (L), and through a second one in front of D's replica alone (S),
        alternating rounds, the median of each. L against R and S against D are the
        balancer's own cost on the same replicas; L against D adds what splitting one
        load over three processes costs. CPU is sampled at the
        window's edges for every process on the path."""
        s = self.sizes
        haproxy_bin = subprocess.run(
            [str(ROOT / "scripts" / "debian-tools"), "haproxy"], check=True,
            capture_output=True, text=True).stdout.strip().splitlines()[-1]
        argv = list(self.servers["gateway"].argv)
        env = dict(self.servers["gateway"].env)
        lb_env = dict(os.environ, TOKENWIRE_LB_ADMIN=str(self.logs / "haproxy.sock"))
        replicas = []
        for n in (1, 2, 3):
            health = free_port()
            replica = Server(f"replica{n}", [*argv, "--health-listen", f"127.0.0.1:{health}"],
                             env)
            self.start(replica)
            replicas.append(replica)
            lb_env[f"TOKENWIRE_REPLICA_{n}"] = f"127.0.0.1:{replica.port}"
            lb_env[f"TOKENWIRE_HEALTH_{n}"] = str(health)
        single_env = dict(lb_env, TOKENWIRE_LB_ADMIN=str(self.logs / "haproxy1.sock"))
        for n in (2, 3):
            single_env[f"TOKENWIRE_REPLICA_{n}"] = lb_env["TOKENWIRE_REPLICA_1"]
            single_env[f"TOKENWIRE_HEALTH_{n}"] = lb_env["TOKENWIRE_HEALTH_1"]
        balancers = []
        for name, env_of in (("balancer", lb_env), ("balancer1", single_env)):
            balancer = Server(name, [haproxy_bin, "-db", "-f",
                                     str(ROOT / "deploy" / "haproxy.cfg")], env_of,
                              port=free_port())
            env_of["TOKENWIRE_LB_LISTEN"] = f"127.0.0.1:{balancer.port}"
            self.start(balancer)
            balancers.append(balancer)
        time.sleep(2.5)  # every replica's first health probe, and HAProxy's checks UP
        streams = 300
        window = min(s.paced_window, 5.0)
        tokens = math.ceil(30 * (s.paced_ramp + s.paced_warmup + window + 3))
        runs: dict[str, Any] = {}
        try:
            for key in ("D.go", "R.go", "L.go", "S.go") * (2 if self.args.quick else 3):
                pids = {"D.go": {"replica1": replicas[0].pid},
                        "R.go": {r.name: r.pid for r in replicas},
                        "L.go": {**{r.name: r.pid for r in replicas},
                                 "haproxy": balancers[0].pid},
                        "S.go": {"replica1": replicas[0].pid,
                                 "haproxy": balancers[1].pid}}[key]
                conns = 3 if key == "R.go" else 4
                self.log(f"{streams} streams × 30 tokens/s, {conns} connections, {key}")
                self.settle()
                edges: list[dict[str, int]] = []
                timers = [threading.Timer(at, _sample_cpu, (pids, edges))
                          for at in (s.paced_ramp + s.paced_warmup,
                                     s.paced_ramp + s.paced_warmup + window)]
                for timer in timers:
                    timer.start()
                out = self.read(key, "throughput", streams=streams, tokens=tokens,
                                interval_us=f"{PACE_US:.3f}", ramp=s.paced_ramp,
                                warmup=s.paced_warmup, window=window, conns=conns,
                                settled=True)
                for timer in timers:
                    timer.join()
                out["cpu_ticks_by_process"] = {name: edges[1][name] - edges[0][name]
                                               for name in pids}
                runs.setdefault("paced_rounds", {}).setdefault(key, []).append(out)
                lat = out.get("latency_ns", {})
                self.log(f"  {out['tokens_per_s']:,.0f} tokens/s, errors {out['errors']}, "
                         f"p50 {lat.get('p50', 0) / 1e6:.2f} ms, CPU "
                         f"{sum(out['cpu_ticks_by_process'].values())} ticks")
                self.log(f"time to first token, {key}")
                runs.setdefault("ttft_rounds", {}).setdefault(key, []).append(self.read(
                    key, "ttft", tokens=8, requests=s.ttft_requests,
                    warmup_requests=s.ttft_warmup))
            runs["paced"] = {key: sorted(rounds, key=lambda r: sum(
                r["cpu_ticks_by_process"].values()) / max(r["tokens"], 1))[len(rounds) // 2]
                for key, rounds in runs["paced_rounds"].items()}
            runs["ttft"] = {key: sorted(rounds, key=lambda r: r["ttft_ns"]["p50"])[
                len(rounds) // 2] for key, rounds in runs["ttft_rounds"].items()}
            runs["haproxy"] = subprocess.run([haproxy_bin, "-v"], capture_output=True,
                                             text=True).stdout.splitlines()[0]
        finally:
            for server in (*balancers, *replicas):
                self.stop(server)
                del self.servers[server.name]
        self.results["phases"]["balancer"] = runs

    def run(self) -> dict[str, Any]:
        self.results["meta"] = meta(self.args)
        self.start_all()
        try:
            phases = self.args.phases.split(",")
            for name in ("throughput", "ttft", "cancel", "paced", "hotpath", "curve", "workers",
                         "backends", "resume", "limits", "headers", "balancer"):
                if "all" in phases or name in phases:
                    getattr(self, f"phase_{name}")()
        finally:
            self.stop_all()
        return self.results


def _median_round(key: str, outs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of a path's rounds: by CPU per token, or by latency for A (no server)."""
    if key == "A.go":
        ordered = sorted(outs, key=lambda o: o.get("latency_ns", {}).get("p50", 0))
    else:
        ordered = sorted(outs, key=lambda o: o["server_cpu_ticks"] / max(o["tokens"], 1))
    return ordered[len(ordered) // 2]


def _sample_cpu(pids: dict[str, int], into: list[dict[str, int]]) -> None:
    """CPU ticks of each named process now, appended to ``into``."""
    into.append({name: cpu_ticks(pid) for name, pid in pids.items()})


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def meta(args: argparse.Namespace) -> dict[str, Any]:
    cpu = "-"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "-")
    except OSError:
        pass
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "client"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    go = shutil.which("go")
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick, "host": platform.node(), "cpus": os.cpu_count(), "cpu": cpu,
        "clk_tck": CLK_TCK,
        "kernel": platform.release(), "python": platform.python_version(),
        "go": subprocess.run([go, "env", "GOVERSION"], capture_output=True,
                             text=True).stdout.strip() if go else "-",
        "git_rev": rev + ("+dirty" if dirty else ""),
        "server_pythonpath": args.server_pythonpath or "",
        "packages": {d: _version(d) for d in ("grpcio", "protobuf", "httpx", "httpcore",
                                              "anyio", "sniffio", "orjson", "uvloop",
                                              "fastapi", "starlette", "uvicorn", "httptools")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (about 4 minutes)")
    parser.add_argument("--bin-dir", required=True, help="where upstream and loadgen are")
    parser.add_argument("--log-dir", default="", help="server logs (default: a temp dir)")
    parser.add_argument("--out", default=str(BENCH / "results" / "latest.json"))
    parser.add_argument("--save", action="store_true",
                        help="also write bench/results/<date>-<machine>.{json,md} to commit")
    parser.add_argument("--phases", default="all",
                        help="comma list of throughput,ttft,cancel,paced,hotpath,curve,"
                             "workers,backends,resume,limits,headers,balancer (default all)")
    parser.add_argument("--nginx", default="",
                        help="nginx binary: path P, the proxy floor of the hot-path phase "
                             "(scripts/bench passes Debian's nginx-light)")
    parser.add_argument("--baseline", default="",
                        help="git revision whose tokenwire-server runs beside this one as "
                             "path O (hot-path phase), e.g. the commit before a change")
    parser.add_argument("--server-cmd", default=str(Path(sys.executable).with_name(
        "tokenwire-server")), help="tokenwire server command (default: the venv's)")
    parser.add_argument("--server-pythonpath", default="",
                        help="prepend to the gateway's PYTHONPATH, e.g. a patched copy of "
                             "service/ to compare against")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra tokenwire-server flag (repeatable), "
                             "e.g. --server-arg=--log-level=WARNING")
    args = parser.parse_args()
    if not args.log_dir:
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        args.log_dir = str(tmp / f"tokenwire-bench-{os.getpid()}")
    from report import render  # bench/report.py, next to this file

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through Bench.run, which stops every server

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    started = time.monotonic()
    results = Bench(args).run()
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    table = render(results)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    if args.save:
        stem = f"{results['meta']['date_utc'][:10]}-{machine_label(results['meta'])}"
        (out.parent / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
        (out.parent / f"{stem}.md").write_text(table + "\n")
        print(f"bench: saved bench/results/{stem}.{{json,md}}", file=sys.stderr)
    print(f"bench: figures in {out} and {out.with_suffix('.md')}; server logs in {args.log_dir}",
          file=sys.stderr)


def machine_label(m: dict[str, Any]) -> str:
    cpu = "".join(c if c.isalnum() else "-" for c in str(m.get("cpu", "cpu")).lower())
    return f"{m.get('cpus')}cpu-{cpu.strip('-')}"[:40].strip("-")


if __name__ == "__main__":
    main()
