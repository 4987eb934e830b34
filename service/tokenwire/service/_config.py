"""Settings: one object built from flags and environment, printed at start."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Settings", "ollama_url_from_env", "parse_settings"]

_ENV_PREFIX = "TOKENWIRE_"


def ollama_url_from_env(value: str | None) -> str:
    """Reads OLLAMA_HOST the way Ollama's own CLI does.

    Scheme defaults to http; host to 127.0.0.1; port to 11434 when no scheme
    is given (80/443 with an explicit http/https scheme).
    """
    s = (value or "").strip().strip("\"'")
    if not s:
        return "http://127.0.0.1:11434"
    default_port = "11434"
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "http", s
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    hostport, _, path = hostport.partition("/")
    host, port = _split_host_port(hostport)
    if host is None:
        host, port = "127.0.0.1", default_port
        bare = hostport.strip("[]")
        if bare:
            host = bare
    if not port or not port.isdigit() or int(port) > 65535:
        port = default_port
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}" + (f"/{path}" if path else "")


def _split_host_port(hostport: str) -> tuple[str | None, str]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end != -1 and hostport[end + 1:end + 2] == ":":
            return hostport[1:end], hostport[end + 2:]
        return None, ""
    if hostport.count(":") == 1:
        host, port = hostport.split(":")
        return host, port
    return None, ""


@dataclass(frozen=True)
class Settings:
    """Server settings. Every field has a flag and a TOKENWIRE_* variable."""

    listen: str = field(default="127.0.0.1:50051", metadata={"help": "address to serve gRPC on"})
    ollama_url: str = field(
        default="", metadata={"help": "Ollama base URL (default: from OLLAMA_HOST, as Ollama's "
                                      "CLI reads it, else http://127.0.0.1:11434)"})
    connect_timeout: float = field(default=5.0, metadata={
        "help": "seconds to connect to Ollama"})
    first_token_timeout: float = field(default=300.0, metadata={
        "help": "seconds to wait for the first chunk (covers queueing and model load); "
                "a call's own deadline replaces it"})
    idle_timeout: float = field(default=60.0, metadata={
        "help": "seconds allowed between two chunks"})
    max_message_bytes: int = field(default=32 << 20, metadata={
        "help": "largest gRPC message accepted or sent, in bytes"})
    max_prompt_bytes: int = field(default=1 << 20, metadata={
        "help": "largest prompt (or total chat text, or embed inputs), in bytes"})
    max_images_bytes: int = field(default=16 << 20, metadata={
        "help": "largest total image payload per request, in bytes"})
    max_concurrent_streams: int = field(default=1000, metadata={
        "help": "HTTP/2 concurrent streams per client connection"})
    upstream_connections: int = field(default=1000, metadata={
        "help": "size of the connection pool to Ollama"})
    health_interval: float = field(default=5.0, metadata={
        "help": "seconds between upstream health probes"})
    shutdown_grace: float = field(default=30.0, metadata={
        "help": "seconds in-flight calls get to finish on SIGTERM/SIGINT"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})

    def resolved_ollama_url(self) -> str:
        return self.ollama_url or ollama_url_from_env(os.environ.get("OLLAMA_HOST"))

    def describe(self) -> str:
        """One line per setting (no secrets exist yet; keep it that way here)."""
        values = dataclasses.asdict(self)
        values["ollama_url"] = self.resolved_ollama_url()
        return "\n".join(f"  {k:<24} {v}" for k, v in values.items())

    def listen_is_loopback(self) -> bool:
        host = self.listen.rpartition(":")[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_settings(argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over TOKENWIRE_* variables, which win over defaults."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="tokenwire-server",
        description="gRPC gateway that streams LLM tokens from Ollama.",
        epilog="Each flag can also be set by its TOKENWIRE_* environment variable, "
               "e.g. --idle-timeout by TOKENWIRE_IDLE_TIMEOUT.",
    )
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        env_name = _ENV_PREFIX + f.name.upper()
        kind = type(getattr(defaults, f.name))
        raw = env.get(env_name)
        try:
            default = kind(raw) if raw not in (None, "") else getattr(defaults, f.name)
        except ValueError:
            parser.error(f"{env_name}={raw!r} is not a valid {kind.__name__}")
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=kind, default=default,
            help=f"{f.metadata['help']} [env {env_name}; default %(default)s]",
        )
    args = parser.parse_args(argv)
    settings = Settings(**vars(args))
    problems = [
        name for name in ("connect_timeout", "first_token_timeout", "idle_timeout",
                          "health_interval", "max_message_bytes", "max_prompt_bytes",
                          "upstream_connections", "max_concurrent_streams")
        if getattr(settings, name) <= 0
    ]
    if problems:
        parser.error("must be positive: " + ", ".join("--" + p.replace("_", "-") for p in problems))
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.error("--log-level must be DEBUG, INFO, WARNING or ERROR")
    return settings
