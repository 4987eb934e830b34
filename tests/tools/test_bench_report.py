"""bench/report.py's hot-path targets (issue #14), on made-up runs: each target's PASS and
FAIL sides, so a wrong comparison in the report cannot print PASS."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest

from tests.tools.conftest import ROOT

_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
sys.modules["bench_report"] = report
_spec.loader.exec_module(report)

CLK = 100


def _run(us_per_token: float, tokens: int = 90_000, window: float = 10.0, p50_ms: float = 0.2,
         p99_ms: float = 3.0, errors: int = 0, proto: str = "grpc") -> dict[str, Any]:
    return {"proto": proto, "tokens": tokens, "window_s": window,
            "tokens_per_s": tokens / window, "messages": tokens, "errors": errors,
            "server_cpu_ticks": round(us_per_token * tokens * CLK / 1e6),
            "latency_ns": {"p50": p50_ms * 1e6, "p99": p99_ms * 1e6}}


def _results(c_us: float = 40.0, c_p50: float = 1.1, c_p99: float = 7.0,
             big_tokens: int = 300_000, big_errors: int = 0, big_p99: float = 22.0,
             ttft_c: float = 1.2, zero_ratio: float = 1.0) -> dict[str, Any]:
    paced = {"A.go": _run(0, p50_ms=0.1, p99_ms=2.0, proto="ndjson"),
             "P.go": _run(20.0, p50_ms=0.3, p99_ms=3.0, proto="ndjson"),
             "C.go": _run(c_us, p50_ms=c_p50, p99_ms=c_p99)}
    big = {"A.go": _run(0, tokens=300_000, p50_ms=0.3, p99_ms=4.0, proto="ndjson"),
           "C.go": _run(30.0, tokens=big_tokens, p99_ms=big_p99, errors=big_errors)}
    return {"meta": {"clk_tck": CLK}, "phases": {"hotpath": {
        "paced": paced, "paced_1000": big,
        "ttft": {"A.go": {"ttft_ns": {"p50": 0.25e6}}, "C.go": {"ttft_ns": {"p50": ttft_c * 1e6}}},
        "zero": {"single": {"C.go": {"tokens_per_s": 100_000 * zero_ratio},
                            "O.go": {"tokens_per_s": 100_000}}},
        "baseline": "abc1234"}}}


def _verdicts(results: dict[str, Any]) -> dict[str, bool | None]:
    return {name: ok for name, _, ok in report.targets(results, CLK)}


def _find(verdicts: dict[str, bool | None], words: str) -> bool | None:
    [name] = [n for n in verdicts if words in n]
    return verdicts[name]


def test_every_target_passes_at_its_limit() -> None:
    got = _verdicts(_results())
    assert _find(got, "CPU/token ≤ 2.0× nginx") is True  # 40 against 20 µs: exactly 2.0×
    assert _find(got, "added over direct p50 ≤ 1 ms") is True  # 1.1 - 0.1
    assert _find(got, "added over direct p99 ≤ 5 ms") is True  # 7.0 - 2.0
    assert _find(got, "every token delivered") is True
    assert _find(got, "1000×30 tok/s: latency added over direct p99 ≤ 20 ms") is True
    assert _find(got, "time to first token: overhead over direct") is True  # 0.95 ms
    assert _find(got, "zero delay, single stream") is True


@pytest.mark.parametrize(("change", "words"), [
    ({"c_us": 40.5}, "CPU/token ≤ 2.0× nginx"),
    ({"c_p50": 1.2}, "added over direct p50 ≤ 1 ms"),
    ({"c_p99": 7.1}, "added over direct p99 ≤ 5 ms"),
    ({"big_tokens": 296_000}, "every token delivered"),  # 29,600 tokens/s: under 99 %
    ({"big_errors": 1}, "every token delivered"),
    ({"big_p99": 24.1}, "1000×30 tok/s: latency added over direct p99 ≤ 20 ms"),
    ({"ttft_c": 1.3}, "time to first token: overhead over direct"),
    ({"zero_ratio": 0.89}, "zero delay, single stream"),
])
def test_each_target_fails_past_its_limit(change: dict[str, Any], words: str) -> None:
    assert _find(_verdicts(_results(**change)), words) is False


def test_the_report_shows_the_ratio_to_the_proxy_floor() -> None:
    text = report.render(_results())
    row = next(line for line in text.splitlines() if line.startswith("| C: tokenwire |"))
    assert "| 40.0 | 2.00 |" in row
    assert "| 1.00 / 5.00 |" in row  # added over A, p50 / p99
