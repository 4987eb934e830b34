"""Settings: flags over environment over defaults; OLLAMA_HOST as Ollama reads it."""

from __future__ import annotations

import os

import pytest

from tokenwire.service import Settings, ollama_url_from_env, parse_settings


@pytest.mark.parametrize(
    ("value", "url"),
    [
        (None, "http://127.0.0.1:11434"),
        ("", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://0.0.0.0:11434"),
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("example.internal", "http://example.internal:11434"),
        ("http://example.internal", "http://example.internal:80"),
        ("https://example.internal", "https://example.internal:443"),
        ("https://example.internal:9999/ollama", "https://example.internal:9999/ollama"),
        ("[::1]:11435", "http://[::1]:11435"),
        ("::1", "http://[::1]:11434"),
        ('"localhost:1234"', "http://localhost:1234"),
    ],
)
def test_ollama_host_parsing(value: str | None, url: str) -> None:
    assert ollama_url_from_env(value) == url


def test_precedence_flags_env_defaults() -> None:
    env = {"TOKENWIRE_LISTEN": "127.0.0.1:6000", "TOKENWIRE_IDLE_TIMEOUT": "7.5"}
    assert parse_settings([], env).listen == "127.0.0.1:6000"
    assert parse_settings([], env).idle_timeout == 7.5
    assert parse_settings(["--listen", "127.0.0.1:7000"], env).listen == "127.0.0.1:7000"
    assert parse_settings([], {}).listen == Settings().listen


def test_ollama_url_from_env_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    assert parse_settings([], {}).resolved_ollama_url() == "http://127.0.0.1:9"
    settings = parse_settings(["--ollama-url", "http://10.0.0.1:1"], {})
    assert settings.resolved_ollama_url() == "http://10.0.0.1:1"
    assert "http://10.0.0.1:1" in settings.describe()


def test_bad_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--idle-timeout", "0"], {})
    assert "--idle-timeout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--max-pending-calls", "0"], {})
    assert "--max-pending-calls" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings([], {"TOKENWIRE_CONNECT_TIMEOUT": "soon"})
    assert "TOKENWIRE_CONNECT_TIMEOUT" in capsys.readouterr().err


def test_workers(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_settings([], {}).workers == 1
    assert parse_settings([], {"TOKENWIRE_WORKERS": "3"}).workers == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert parse_settings(["--workers", "0"], {}).workers == 3  # the CPUs we may use
    monkeypatch.delattr(os, "sched_getaffinity")  # not Linux
    assert parse_settings([], {"TOKENWIRE_WORKERS": "0"}).workers == 8
    with pytest.raises(SystemExit):
        parse_settings(["--workers", "-1"], {})
    assert "--workers" in capsys.readouterr().err


def test_metrics_listen(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_settings([], {}).metrics_listen == ""  # off by default
    assert parse_settings([], {"TOKENWIRE_METRICS_LISTEN": "0.0.0.0:9464"}).metrics_listen \
        == "0.0.0.0:9464"
    assert parse_settings(["--metrics-listen", "[::1]:9464"], {}).metrics_listen == "[::1]:9464"
    for bad in ("9464", "host:", ":9464", "host:port", "host:70000"):
        with pytest.raises(SystemExit):
            parse_settings(["--metrics-listen", bad], {})
        assert "is not host:port" in capsys.readouterr().err


def test_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_settings([], {}).log_format == "text"
    assert parse_settings([], {"TOKENWIRE_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SystemExit):
        parse_settings(["--log-format", "xml"], {})
    assert "--log-format must be text or json" in capsys.readouterr().err


def test_per_peer_limits(capsys: pytest.CaptureFixture[str]) -> None:
    defaults = parse_settings([], {})
    assert (defaults.max_streams_per_peer, defaults.rate_per_peer) == (0, 0.0)  # off
    assert defaults.max_streams_per_caller == 256
    settings = parse_settings(["--max-streams-per-peer", "64"],
                              {"TOKENWIRE_RATE_PER_PEER": "2.5"})
    assert (settings.max_streams_per_peer, settings.rate_per_peer) == (64, 2.5)
    for flag in ("--max-streams-per-peer", "--rate-per-peer"):
        with pytest.raises(SystemExit):
            parse_settings([flag, "-1"], {})
        assert flag in capsys.readouterr().err


def test_health_listen(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_settings([], {}).health_listen == ""  # off by default
    # Kubelet probes the pod's address: a non-loopback plaintext health port is fine,
    # while the main port on that address would still need TLS or --insecure.
    assert parse_settings(["--health-listen", "0.0.0.0:8081"], {}).health_listen \
        == "0.0.0.0:8081"
    for bad in ("8081", "host:", "host:port"):
        with pytest.raises(SystemExit):
            parse_settings(["--health-listen", bad], {})
        assert "is not host:port" in capsys.readouterr().err
    for clash in (["--listen", "127.0.0.1:7000", "--health-listen", "0.0.0.0:7000"],
                  ["--metrics-listen", "127.0.0.1:9464", "--health-listen", "[::]:9464"]):
        with pytest.raises(SystemExit):
            parse_settings(clash, {})
        assert "needs a port of its own" in capsys.readouterr().err
    assert parse_settings(["--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"],
                          {}).health_listen == "127.0.0.1:0"
