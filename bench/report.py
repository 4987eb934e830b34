"""Turns the JSON figures of bench/run.py into the markdown report (figures and targets).

    python bench/report.py bench/results/latest.json     # re-render a saved run
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

KEYS = ("A.py", "A.go", "B.py", "B.go", "C.py", "C.go")
HEAD = ("A httpx→upstream · py", "A · go", "B FastAPI SSE · py", "B · go",
        "C tokenwire · py", "C · go")
CLK_TCK = 100


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _ms(ns: float | None) -> str:
    return "–" if ns is None else f"{ns / 1e6:.2f}"


def cpu_us_per_token(run: dict[str, Any] | None, clk_tck: int) -> float | None:
    if not run or not run.get("tokens") or run.get("server_cpu_ticks") is None:
        return None
    if run.get("proto") == "ndjson" and not run["server_cpu_ticks"]:
        return None  # A: no server in between
    return run["server_cpu_ticks"] / clk_tck * 1e6 / run["tokens"]


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    ph = results.get("phases", {})
    clk = int(meta.get("clk_tck", CLK_TCK))
    zero = ph.get("zero_delay", {})
    ttft = ph.get("ttft", {})
    cancel = ph.get("cancel", {})
    paced = ph.get("paced_1000x30", {})
    lines: list[str] = []
    out = lines.append

    out(f"# tokenwire benchmark — {meta.get('date_utc', '?')}"
        f"{' (quick)' if meta.get('quick') else ''}")
    out("")
    out(f"Machine: {meta.get('cpus')} × {meta.get('cpu')}, Linux {meta.get('kernel')}, "
        f"Python {meta.get('python')}, {meta.get('go')}; tokenwire {meta.get('git_rev')}"
        + (f" (server from {meta['server_pythonpath']})" if meta.get("server_pythonpath")
           else "") + f"; run took {meta.get('duration_s', '?')} s.")
    pk = meta.get("packages", {})
    out("Packages: " + ", ".join(f"{k} {v}" for k, v in pk.items()) + ".")
    out("")
    out("Paths: **A** httpx reads the Go upstream's NDJSON directly (the floor); **B** the "
        "FastAPI + SSE peer (uvicorn, uvloop, httptools, one shared httpx client); **C** "
        "tokenwire. Each is read by a Python reader (`py`: httpx for A/B, "
        "`tokenwire.client.AsyncClient` for C) and by the compiled Go reader (`go`). "
        "Tokens are counted by text.")
    out("")
    out("## Figures")
    out("")
    out("| figure | " + " | ".join(HEAD) + " |")
    out("|---" * (len(KEYS) + 1) + "|")

    def row(label: str, f: Callable[[str], str]) -> None:
        out(f"| {label} | " + " | ".join(f(k) for k in KEYS) + " |")

    for label, name in (("single stream", "single"), ("10 streams", "c10"),
                        ("100 streams", "c100"), ("1000 streams", "c1000")):
        if name in zero:
            row(f"tokens/s, zero delay, {label}",
                lambda k, n=name: _num(_get(zero, n, k, "tokens_per_s")))
    if ttft:
        for q in ("p50", "p99"):
            row(f"time to first token {q}, ms", lambda k, q=q: _ms(_get(ttft, k, "ttft_ns", q)))
        for q in ("p50", "p99"):
            def over(k: str, q: str = q) -> str:
                base = _get(ttft, "A" + k[1:], "ttft_ns", q)
                v = _get(ttft, k, "ttft_ns", q)
                return "–" if k[0] == "A" or base is None or v is None else _ms(v - base)
            row(f"TTFT overhead over A (same reader) {q}, ms", over)
    if paced:
        row("1000×30 tok/s: tokens/s delivered", lambda k: _num(_get(paced, k, "tokens_per_s")))
        row("1000×30 tok/s: errors", lambda k: _num(_get(paced, k, "errors")))
        for q in ("p50", "p99"):
            row(f"1000×30: token latency (arrival − emission) {q}, ms",
                lambda k, q=q: _ms(_get(paced, k, "latency_ns", q)))
        for q in ("p50", "p99"):
            # Only against the compiled reader: at 30 000 tokens/s a Python reader is
            # itself the bottleneck, so its A figure is no floor.
            def added(k: str, q: str = q) -> str:
                base = _get(paced, "A.go", "latency_ns", q)
                v = _get(paced, k, "latency_ns", q)
                return "–" if k[0] == "A" or k[-2:] != "go" or base is None or v is None \
                    else _ms(v - base)
            row(f"1000×30: latency added over A {q}, ms (go reader)", added)
    for label, name in (("zero delay, 100 streams", "c100"),
                        ("zero delay, 1000 streams", "c1000")):
        if name in zero:
            row(f"tokens per message, {label}",
                lambda k, n=name: _num(_per_msg(_get(zero, n, k)), "{:.1f}"))
    if paced:
        row("tokens per message, 1000×30 tok/s", lambda k: _num(_per_msg(_get(paced, k)), "{:.2f}"))
    for label, src in (("zero delay, 100 streams", _get(zero, "c100")),
                       ("zero delay, 1000 streams", _get(zero, "c1000")),
                       ("1000×30 tok/s", paced or None)):
        if src:
            row(f"server CPU µs/token, {label}",
                lambda k, s=src: _num(cpu_us_per_token(_get(s, k), clk), "{:.1f}"))
    if paced:
        row("server peak RSS, 1000 open streams (VmHWM), MiB",
            lambda k: _num(_kb(_get(paced, k, "vm_hwm_kb")), "{:.0f}"))
        row("server RSS before the 1000 streams, MiB",
            lambda k: _num(_kb(_get(paced, k, "rss_idle_kb")), "{:.0f}"))
    if cancel:
        for q in ("p50", "p99"):
            row(f"cancel → upstream close {q}, ms",
                lambda k, q=q: _ms(_get(cancel, k, "cancel_to_close_ns", q)))
        row("cancels never seen by upstream",
            lambda k: _num(_get(cancel, k, "never_closed")))

    floor = _get(paced, "G.go")
    if floor:
        floor_cpu = cpu_us_per_token(floor, clk)
        cpu_x = _ratio(floor_cpu, cpu_us_per_token(_get(paced, "B.go"), clk))
        rss_x = _ratio(_get(floor, "vm_hwm_kb"), _get(paced, "B.go", "vm_hwm_kb"))
        out("")
        out("**G, the grpc.aio floor** (`bench/floor_grpc.py`: one grpc.aio process writing "
            "one message per token from timers, no upstream), 1000 × 30 tokens/s, go reader: "
            f"{_num(_get(floor, 'tokens_per_s'))} tokens/s, errors {_num(_get(floor, 'errors'))}, "
            f"latency p50 {_ms(_get(floor, 'latency_ns', 'p50'))} ms, "
            f"p99 {_ms(_get(floor, 'latency_ns', 'p99'))} ms, "
            f"CPU {_num(floor_cpu, '{:.1f}')} µs/token ({_num(cpu_x, '{:.2f}')}× B's), "
            f"peak RSS {_num(_kb(_get(floor, 'vm_hwm_kb')), '{:.0f}')} MiB "
            f"({_num(rss_x, '{:.2f}')}× B's; {_num(_kb(_get(floor, 'rss_idle_kb')), '{:.0f}')} "
            "MiB before the streams).")
    hot = ph.get("hotpath", {})
    if hot:
        _hotpath(out, hot, clk)
    curve = ph.get("curve", {})
    if curve:
        levels = sorted(curve, key=int)
        out("")
        out("## Latency against load, 30 tokens/s per stream, compiled reader")
        out("")
        out("Token latency p50 / p99 in ms, then server CPU µs/token (1000: the table above). "
            "G is the grpc.aio floor.")
        out("")
        out("| path | " + " | ".join(f"{n} streams" for n in levels) + " |")
        out("|---" * (len(levels) + 1) + "|")
        for key, label in (("B.go", "B FastAPI SSE"), ("C.go", "C tokenwire"),
                           ("G.go", "G grpc.aio floor")):
            cells = []
            for n in levels:
                run = _get(curve, n, key)
                cells.append(f"{_ms(_get(run, 'latency_ns', 'p50'))} / "
                             f"{_ms(_get(run, 'latency_ns', 'p99'))}; "
                             f"{_num(cpu_us_per_token(run, clk), '{:.1f}')} µs")
            out(f"| {label} | " + " | ".join(cells) + " |")
    workers = ph.get("workers", {})
    if workers:
        out("")
        out("## `--workers` (SO_REUSEPORT), compiled reader over 8 connections")
        out("")
        out("| workers | zero delay, 100 streams: tokens/s | CPU µs/token | 1000×30: tokens/s "
            "| errors | latency p50, ms | p99, ms | CPU µs/token |")
        out("|---|---|---|---|---|---|---|---|")
        for n, run in sorted(workers.items(), key=lambda kv: int(kv[0])):
            zero_run, paced_run = run.get("zero_c100"), run.get("paced_1000x30")
            out(f"| {n} | {_num(_get(zero_run, 'tokens_per_s'))} "
                f"| {_num(cpu_us_per_token(zero_run, clk), '{:.1f}')} "
                f"| {_num(_get(paced_run, 'tokens_per_s'))} | {_num(_get(paced_run, 'errors'))} "
                f"| {_ms(_get(paced_run, 'latency_ns', 'p50'))} "
                f"| {_ms(_get(paced_run, 'latency_ns', 'p99'))} "
                f"| {_num(cpu_us_per_token(paced_run, clk), '{:.1f}')} |")
    backends = ph.get("backends", {})
    if backends:
        out("")
        out("## Engines and routing (issue #11), compiled reader, back to back")
        out("")
        wire = backends.get("wire", {})
        out("| engine wire, zero delay, 100 streams | tokens/s | CPU µs/token |")
        out("|---|---|---|")
        for label, name in (("ollama", "Ollama NDJSON (`--ollama-url`)"),
                            ("openai", "OpenAI SSE (`kind = \"openai\"`)")):
            run = wire.get(label)
            out(f"| {name} | {_num(_get(run, 'tokens_per_s'))} "
                f"| {_num(cpu_us_per_token(run, clk), '{:.2f}')} |")
        routing = backends.get("routing", {})
        if routing:
            out("")
            out("| routing | gateway CPU µs per call (sequential one-token calls; rounds) |")
            out("|---|---|")
            for label, values in routing.items():
                out(f"| {label} | {', '.join(f'{v:.0f}' for v in values)} |")
            alone = backends.get("routing_alone", {})
            for label, added in alone.get("added_us", {}).items():
                out(f"| routing code alone (bench/routing.py), {label} | +{added:.2f} µs over "
                    f"the one-upstream path ({alone.get('base_us', 0):.2f} µs) |")
        failover = backends.get("failover", {})
        if failover:
            out("")
            out("| time to first token | p50, ms | p99, ms |")
            out("|---|---|---|")
            for label in ("direct", "failover"):
                run = failover.get(label)
                out(f"| {label} | {_ms(_get(run, 'ttft_ns', 'p50'))} "
                    f"| {_ms(_get(run, 'ttft_ns', 'p99'))} |")
    resumed = ph.get("resume", {})
    if resumed:
        out("")
        out("## Resumable streams (issue #12), Python reader, back to back")
        out("")
        out("| stream, zero delay, 100 streams | tokens/s | gateway CPU µs/token "
            "| redis-server CPU µs/token (whole run, an upper bound) |")
        out("|---|---|---|---|")
        for label, name in (("plain", "plain"), ("resumable", "resumable, in memory"),
                            ("redis", "resumable, mirrored to Redis")):
            run = resumed.get("cpu", {}).get(label)
            redis_us = (None if run is None or label != "redis" else
                        run["redis_cpu_ticks"] / clk / max(run["tokens"], 1) * 1e6)
            out(f"| {name} | {_num(_get(run, 'tokens_per_s'))} "
                f"| {_num(cpu_us_per_token(run, clk), '{:.2f}')} "
                f"| {_num(redis_us, '{:.2f}')} |")
        out("")
        out("| time to first token | p50, ms | p99, ms |")
        out("|---|---|---|")
        for label in ("plain", "resumable"):
            run = resumed.get("ttft", {}).get(label)
            out(f"| {label} start | {_ms(_get(run, 'ttft_ns', 'p50'))} "
                f"| {_ms(_get(run, 'ttft_ns', 'p99'))} |")
        replay = resumed.get("replay")
        out(f"| Resume of a finished stream: first replayed token "
            f"| {_ms(_get(replay, 'first_replayed_ns', 'p50'))} "
            f"| {_ms(_get(replay, 'first_replayed_ns', 'p99'))} |")
    limits = ph.get("limits", {})
    if limits:
        out("")
        out("## Shared admission and budgets (issue #13), Python reader, back to back")
        out("")
        out("| limits and a token budget, calls of 4 tokens, 100 at a time | calls/s "
            "| gateway CPU µs/call | redis-server CPU µs/call (whole run, an upper bound) "
            "| TTFT p50, ms | TTFT p99, ms |")
        out("|---|---|---|---|---|---|")
        for label, name in (("local", "in this process"), ("redis", "shared in Redis")):
            run = limits.get("cpu", {}).get(label)
            t = limits.get("ttft", {}).get(label)
            redis_us = (None if run is None or label != "redis" else
                        run["redis_cpu_ticks"] / clk / _calls(run) * 1e6)
            rate = None if run is None else _calls(run) / run["window_s"]
            out(f"| {name} | {_num(rate)} | {_num(cpu_us_per_call(run, clk), '{:.0f}')} "
                f"| {_num(redis_us, '{:.0f}')} | {_ms(_get(t, 'ttft_ns', 'p50'))} "
                f"| {_ms(_get(t, 'ttft_ns', 'p99'))} |")
    headers = ph.get("headers", {}).get("ttft", {})
    if headers:
        out("")
        out("## When response headers go out (issue #13, --initial-metadata), back to back")
        out("")
        out("| reader | order | TTFT p50, ms | TTFT p99, ms |")
        out("|---|---|---|---|")
        for key, by_order in headers.items():
            for order in ("first-token", "early"):
                t = by_order.get(order)
                out(f"| {key} | {order} | {_ms(_get(t, 'ttft_ns', 'p50'))} "
                    f"| {_ms(_get(t, 'ttft_ns', 'p99'))} |")

    balancer = ph.get("balancer", {})
    if balancer:
        out("")
        out(f"## Through a load balancer (issue #13), compiled reader, back to back "
            f"({balancer.get('haproxy', 'HAProxy')})")
        out("")
        out("| 300 streams × 30 tokens/s, 4 connections | tokens/s | errors "
            "| token latency p50 / p99, ms | CPU µs/token, all servers | of which HAProxy "
            "| TTFT p50 / p99, ms |")
        out("|---|---|---|---|---|---|---|")
        for key, name in (("D.go", "one replica, direct"),
                          ("R.go", "three replicas, direct (one connection each)"),
                          ("L.go", "HAProxy + three replicas (deploy/haproxy.cfg)"),
                          ("S.go", "HAProxy + the one replica of the direct row")):
            run = balancer.get("paced", {}).get(key)
            t = balancer.get("ttft", {}).get(key)
            lb = _balancer_cpu(run, clk, "haproxy") if key in ("L.go", "S.go") else None
            out(f"| {name} | {_num(_get(run, 'tokens_per_s'))} | {_num(_get(run, 'errors'))} "
                f"| {_ms(_get(run, 'latency_ns', 'p50'))} / {_ms(_get(run, 'latency_ns', 'p99'))} "
                f"| {_num(_balancer_cpu(run, clk), '{:.1f}')} | {_num(lb, '{:.1f}')} "
                f"| {_ms(_get(t, 'ttft_ns', 'p50'))} / {_ms(_get(t, 'ttft_ns', 'p99'))} |")
    out("")
    out("## Targets (ratios within this run)")
    out("")
    out("| target | measured | result |")
    out("|---|---|---|")
    for name, measured, ok in targets(results, clk):
        out(f"| {name} | {measured} | {'PASS' if ok else 'FAIL' if ok is not None else 'n/a'} |")
    out("")
    out("CPU is utime+stime of the server process and its workers (all threads) over the "
        "measurement window, "
        "divided by the tokens read in it. Latency is per token: reader arrival time minus the "
        "upstream's emission time carried in the token text (same host clock). Cancel: reader "
        "clock at cancel to the upstream's clock when its request context ended.")
    return "\n".join(lines)


HOT_PATHS = (("A.go", "A: the upstream read directly"),
             ("P.go", "P: nginx, plain reverse proxy (the proxy floor)"),
             ("C.go", "C: tokenwire"),
             ("O.go", "O: tokenwire at the baseline revision"),
             ("G.go", "G: the grpc.aio floor (Python, no upstream)"),
             ("F.go", "F: the grpc-go floor (compiled, no upstream)"))


def _hotpath(out: Callable[[str], None], hot: dict[str, Any], clk: int) -> None:
    paced = hot.get("paced", {})
    out("")
    out("## The per-token path at a realistic pace (issue #14), compiled reader")
    out("")
    out("300 streams × 30 tokens/s, one NDJSON line or one message per token; alternating "
        "rounds, the median round of each by CPU. Added latency is over A's in this run.")
    out("")
    p_cpu = cpu_us_per_token(_get(paced, "P.go"), clk)
    _paced_table(out, "300 streams × 30 tokens/s", paced, clk,
                 ("× P", lambda run: _num(_ratio(cpu_us_per_token(run, clk), p_cpu), "{:.2f}")))
    big = hot.get("paced_1000", {})
    if big:
        out("")
        _paced_table(out, "1000 streams × 30 tokens/s", big, clk,
                     ("cores used", lambda run: _num(_cores(run, clk), "{:.2f}")))
    ttft = hot.get("ttft", {})
    if ttft:
        out("")
        out("| time to first token, Go reader | p50, ms | p99, ms | over A p50, ms |")
        out("|---|---|---|---|")
        for key, name in HOT_PATHS:
            run = _get(ttft, key)
            if run is None:
                continue
            base, v = _get(ttft, "A.go", "ttft_ns", "p50"), _get(run, "ttft_ns", "p50")
            over = None if key == "A.go" or base is None or v is None else v - base
            out(f"| {name} | {_ms(v)} | {_ms(_get(run, 'ttft_ns', 'p99'))} | {_ms(over)} |")
    zero = hot.get("zero", {})
    if zero:
        out("")
        out(f"Zero delay, C against O (baseline `{hot.get('baseline', '?')}`), alternating "
            "rounds, median: ")
        out("")
        out("| zero delay | C tokens/s | O tokens/s | C ÷ O | C CPU µs/token | O CPU µs/token |")
        out("|---|---|---|---|---|---|")
        for label, name in (("single", "single stream"), ("c100", "100 streams")):
            c, o = _get(zero, label, "C.go"), _get(zero, label, "O.go")
            out(f"| {name} | {_num(_get(c, 'tokens_per_s'))} | {_num(_get(o, 'tokens_per_s'))} "
                f"| {_num(_ratio(_get(c, 'tokens_per_s'), _get(o, 'tokens_per_s')), '{:.2f}')} "
                f"| {_num(cpu_us_per_token(c, clk), '{:.1f}')} "
                f"| {_num(cpu_us_per_token(o, clk), '{:.1f}')} |")


def _paced_table(out: Callable[[str], None], title: str, runs: dict[str, Any], clk: int,
                 extra: tuple[str, Callable[[dict[str, Any]], str]]) -> None:
    """One row per path of a paced run, with one ``extra`` column after the CPU."""
    out(f"| {title} | tokens/s | errors | CPU µs/token | {extra[0]} "
        "| token latency p50 / p99, ms | added over A p50 / p99, ms | tokens per message |")
    out("|---|---|---|---|---|---|---|---|")
    for key, name in HOT_PATHS:
        run = _get(runs, key)
        if run is None:
            continue
        added = [None if key == "A.go" else _added(runs, key, q) for q in ("p50", "p99")]
        out(f"| {name} | {_num(_get(run, 'tokens_per_s'))} | {_num(_get(run, 'errors'))} "
            f"| {_num(cpu_us_per_token(run, clk), '{:.1f}')} | {extra[1](run)} "
            f"| {_ms(_get(run, 'latency_ns', 'p50'))} / {_ms(_get(run, 'latency_ns', 'p99'))} "
            f"| {_ms(added[0])} / {_ms(added[1])} | {_num(_per_msg(run), '{:.2f}')} |")


def _added(runs: dict[str, Any], key: str, q: str) -> float | None:
    """Token latency of ``key`` minus A's (the upstream read directly), same quantile."""
    base, v = _get(runs, "A.go", "latency_ns", q), _get(runs, key, "latency_ns", q)
    return None if base is None or v is None else v - base


def _cores(run: dict[str, Any] | None, clk: int) -> float | None:
    """Cores the server used over the reader's window."""
    if not run or not run.get("window_s") or run.get("server_cpu_ticks") is None:
        return None
    return float(run["server_cpu_ticks"]) / clk / run["window_s"]


def _hotpath_targets(ph: dict[str, Any], clk: int) -> list[tuple[str, str, bool | None]]:
    """Issue #14's targets."""
    rows: list[tuple[str, str, bool | None]] = []
    hot = ph.get("hotpath", {})
    paced = hot.get("paced", {})
    c_cpu, p_cpu = (cpu_us_per_token(_get(paced, k), clk) for k in ("C.go", "P.go"))
    r = _ratio(c_cpu, p_cpu)
    if r is not None:
        rows.append(("300×30 tok/s: tokenwire CPU/token ≤ 2.0× nginx's (P)",
                     f"{r:.2f}× ({c_cpu:.1f} against {p_cpu:.1f} µs)", r <= 2.0))
    for q, limit in (("p50", 1.0), ("p99", 5.0)):
        added = _added(paced, "C.go", q) if _get(paced, "C.go") else None
        if added is not None:
            rows.append((f"300×30 tok/s: latency added over direct {q} ≤ {limit:g} ms",
                         f"{added / 1e6:.2f} ms", added / 1e6 <= limit))
    c = _get(paced, "C.go")
    if c:
        rows.append(("300×30 tok/s: zero errors", str(c.get("errors")), c.get("errors") == 0))
    paced1000 = hot.get("paced_1000") or ph.get("paced_1000x30", {})
    c = _get(paced1000, "C.go")
    if c:
        want = 1000 * 30
        got = c.get("tokens_per_s", 0)
        cores = _cores(c, clk)
        rows.append(("1000×30 tok/s: every token delivered (zero errors, ≥ 99% of 30,000 "
                     "tokens/s)", f"{got:,.0f} tokens/s, {c.get('errors')} errors, "
                     f"{_num(cores, '{:.2f}')} cores", c.get("errors") == 0 and got >= 0.99 * want))
        added = _added(paced1000, "C.go", "p99")
        if added is not None:
            rows.append(("1000×30 tok/s: latency added over direct p99 ≤ 20 ms",
                         f"{added / 1e6:.2f} ms", added / 1e6 <= 20))
    base, v = (_get(hot, "ttft", k, "ttft_ns", "p50") for k in ("A.go", "C.go"))
    if base is not None and v is not None:
        d = (v - base) / 1e6
        rows.append(("time to first token: overhead over direct p50 ≤ 1.0 ms (Go reader)",
                     f"{d:.2f} ms", d <= 1.0))
    zero = hot.get("zero", {})
    for label, name in (("single", "single stream"), ("c100", "100 streams")):
        r = _ratio(_get(zero, label, "C.go", "tokens_per_s"),
                   _get(zero, label, "O.go", "tokens_per_s"))
        if r is not None:
            # Two shared cores: alternating rounds of the same code differ by up to ~10 %.
            rows.append((f"zero delay, {name}: tokens/s no worse than the baseline "
                         f"(≥ 0.9×, noise)", f"{r:.2f}×", r >= 0.9))
    return rows


def _per_msg(run: dict[str, Any] | None) -> float | None:
    if not run or not run.get("messages"):
        return None
    return float(run["tokens"]) / run["messages"]


def _kb(kb: float | None) -> float | None:
    return None if not kb else kb / 1024


def _calls(run: dict[str, Any]) -> int:
    return max(int(run.get("streams_completed_in_window", 0)), 1)


def cpu_us_per_call(run: dict[str, Any] | None, clk: int) -> float | None:
    return None if run is None else run["server_cpu_ticks"] / clk / _calls(run) * 1e6


def _balancer_cpu(run: dict[str, Any] | None, clk: int, only: str = "") -> float | None:
    """CPU µs per token of the balancer phase's processes (or of one of them)."""
    if not run or not run.get("tokens"):
        return None
    ticks = run.get("cpu_ticks_by_process", {})
    total = ticks.get(only, 0) if only else sum(ticks.values())
    return float(total) / clk * 1e6 / run["tokens"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets(results: dict[str, Any], clk: int) -> list[tuple[str, str, bool | None]]:
    ph = results.get("phases", {})
    zero, ttft = ph.get("zero_delay", {}), ph.get("ttft", {})
    cancel, paced = ph.get("cancel", {}), ph.get("paced_1000x30", {})
    rows: list[tuple[str, str, bool | None]] = []
    for level in ("c10", "c100", "c1000"):
        c = _get(zero, level, "C.py", "tokens_per_s")
        b = _get(zero, level, "B.py", "tokens_per_s")
        name = f"aggregate tokens/s ≥ 2× B, {level[1:]} streams (Python readers)"
        r = _ratio(c, b)
        if r is not None:
            rows.append((name, f"{r:.2f}×", r >= 2))
        elif c is not None and b is not None:  # B's reader got nothing in its window
            rows.append((name, f"C {c:,.0f} tokens/s, B 0: no ratio", None))
    for reader in ("go", "py"):
        for q, limit in (("p50", 1.0), ("p99", 3.0)):
            a = _get(ttft, f"A.{reader}", "ttft_ns", q)
            c = _get(ttft, f"C.{reader}", "ttft_ns", q)
            if a is not None and c is not None:
                d = (c - a) / 1e6
                rows.append((f"TTFT overhead over A {q} ≤ {limit:g} ms ({reader} reader)",
                             f"{d:.2f} ms", d <= limit))
    # Issue #14 replaced the 1000-stream CPU and memory ratios against B by the proxy floor
    # (its rows below); the figures stay in the table.
    for label, src in (("zero delay, 100 streams", _get(zero, "c100")),):
        for reader in ("go", "py"):
            if src:
                r = _ratio(cpu_us_per_token(_get(src, f"C.{reader}"), clk),
                           cpu_us_per_token(_get(src, f"B.{reader}"), clk))
                if r is not None:
                    rows.append((f"server CPU/token ≤ 0.5× B, {label} ({reader} reader)",
                                 f"{r:.2f}×", r <= 0.5))
    for reader in ("go", "py"):
        run = _get(paced, f"C.{reader}")
        if run:
            rows.append((f"1000×30 tok/s: zero errors ({reader} reader)",
                         str(run.get("errors")), run.get("errors") == 0))
            lat = _get(run, "latency_ns", "p99")
            if lat is not None:
                rows.append((f"1000×30 tok/s: token latency p99 ≤ 20 ms ({reader} reader)",
                             f"{lat / 1e6:.2f} ms", lat / 1e6 <= 20))
    for reader in ("go", "py"):
        run = _get(cancel, f"C.{reader}")
        if run:
            p99 = _get(run, "cancel_to_close_ns", "p99")
            ok = p99 is not None and p99 / 1e6 <= 50 and not run.get("never_closed")
            rows.append((f"cancel → upstream close p99 ≤ 50 ms ({reader} reader)",
                         f"{_ms(p99)} ms, {run.get('never_closed')} never closed", ok))
    backends = ph.get("backends", {})
    wire = backends.get("wire", {})
    r = _ratio(cpu_us_per_token(wire.get("openai"), clk), cpu_us_per_token(wire.get("ollama"), clk))
    if r is not None:
        rows.append(("OpenAI SSE path CPU/token ≤ 1.2× the Ollama path, zero delay, 100 streams",
                     f"{r:.2f}×", r <= 1.2))
    routing = backends.get("routing", {})
    alone = backends.get("routing_alone", {}).get("added_us", {})
    if routing.get("1 upstream") and routing.get("4 upstreams"):
        one = sorted(routing["1 upstream"])[len(routing["1 upstream"]) // 2]
        four = sorted(routing["4 upstreams"])[len(routing["4 upstreams"]) // 2]
        worst = max(alone.values(), default=None)
        shown = f"{four - one:+.1f} µs end to end (median of rounds)"
        if worst is not None:
            shown += f"; the routing code alone {worst:+.2f} µs"
        # End to end, a few µs in about a millisecond per call is inside the noise of two
        # shared cores (shown for what it is); the routing code's own cost decides.
        ok = (worst if worst is not None else four - one) <= 20
        rows.append(("routing over 4 upstreams adds ≤ 20 µs of gateway CPU per call",
                     shown, ok))
    failover = backends.get("failover", {})
    direct, moved = (_get(failover, k, "ttft_ns", "p99") for k in ("direct", "failover"))
    if direct is not None and moved is not None:
        d = (moved - direct) / 1e6
        rows.append(("failover after a refused connection: first token ≤ 50 ms later (p99)",
                     f"{d:+.2f} ms", d <= 50))
    resumed = ph.get("resume", {})
    cpu = resumed.get("cpu", {})
    r = _ratio(cpu_us_per_token(cpu.get("resumable"), clk), cpu_us_per_token(cpu.get("plain"), clk))
    if r is not None:
        rows.append(("resumable streams (memory) CPU/token ≤ 1.3× plain, zero delay, 100 streams",
                     f"{r:.2f}×", r <= 1.3))
    r = _ratio(cpu_us_per_token(cpu.get("redis"), clk), cpu_us_per_token(cpu.get("plain"), clk))
    if r is not None:
        rows.append(("resumable streams (Redis) gateway CPU/token ≤ 2× plain, zero delay, "
                     "100 streams", f"{r:.2f}×", r <= 2.0))
    ttft = resumed.get("ttft", {})
    plain, kept = (_get(ttft, k, "ttft_ns", "p50") for k in ("plain", "resumable"))
    if plain is not None and kept is not None:
        d = (kept - plain) / 1e6
        rows.append(("resumable start: TTFT overhead over plain p50 ≤ 1 ms", f"{d:+.2f} ms",
                     d <= 1))
    first = _get(resumed.get("replay"), "first_replayed_ns", "p50")
    if first is not None:
        rows.append(("Resume: first replayed token p50 ≤ 5 ms", f"{first / 1e6:.2f} ms",
                     first / 1e6 <= 5))
    limits = ph.get("limits", {})
    local, shared = (cpu_us_per_call(limits.get("cpu", {}).get(k), clk)
                     for k in ("local", "redis"))
    if local is not None and shared is not None:
        rows.append(("Redis-shared admission and budgets: gateway CPU per call ≤ +50 µs over "
                     "in-process", f"{shared - local:+.0f} µs", shared - local <= 50))
    local, shared = (_get(limits.get("ttft", {}), k, "ttft_ns", "p50") for k in ("local", "redis"))
    if local is not None and shared is not None:
        d = (shared - local) / 1e6
        rows.append(("Redis-shared admission and budgets: TTFT p50 ≤ +1 ms over in-process",
                     f"{d:+.2f} ms", d <= 1))
    headers = ph.get("headers", {}).get("ttft", {}).get("C.go", {})
    late, early = (_get(headers, k, "ttft_ns", "p50") for k in ("first-token", "early"))
    if late is not None and early is not None:
        d = (late - early) / 1e6
        rows.append(("headers with the first token: TTFT p50 ≤ +0.5 ms over early (Go reader)",
                     f"{d:+.2f} ms", d <= 0.5))

    rows += _hotpath_targets(ph, clk)
    balancer = ph.get("balancer", {})
    # The target compares the same replicas with and without the balancer; three
    # replicas behind it against one replica direct is shown too, with no target: it
    # adds what splitting one load over three processes costs on this machine.
    for key, base, what in (("L.go", "R.go", "HAProxy + 3 replicas ≤ 1.3× the 3 read directly"),
                            ("S.go", "D.go", "HAProxy + 1 replica ≤ 1.3× it read directly"),
                            ("L.go", "D.go", "HAProxy + 3 replicas against 1 replica direct")):
        direct, through = (_balancer_cpu(balancer.get("paced", {}).get(k), clk)
                           for k in (base, key))
        r = _ratio(through, direct)
        if r is not None and through is not None and direct is not None:
            alone = _balancer_cpu(balancer["paced"][key], clk, "haproxy") or 0.0
            rows.append((f"CPU/token, {what}, 300 × 30 tokens/s", f"{r:.2f}× ({through:.1f} "
                         f"against {direct:.1f} µs; HAProxy alone {alone:.1f} µs, "
                         f"{alone / direct:.2f}×)", r <= 1.3 if "≤" in what else None))
    direct, through = (_get(balancer.get("ttft", {}), k, "ttft_ns", "p50")
                       for k in ("D.go", "L.go"))
    if direct is not None and through is not None:
        d = (through - direct) / 1e6
        rows.append(("through HAProxy: TTFT overhead p50 ≤ 1 ms", f"{d:+.2f} ms", d <= 1))
    return rows


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render(json.load(f)))
