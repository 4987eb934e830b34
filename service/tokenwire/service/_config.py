"""Settings: one object built from flags and environment, printed at start."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import ipaddress
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .tracing import NEEDS as _TRACING_NEEDS
from .tracing import endpoint_from_env

__all__ = ["Settings", "ollama_url_from_env", "parse_settings", "usable_cpus"]

_ENV_PREFIX = "TOKENWIRE_"


def redact_url(url: str) -> str:
    """The URL without a password (user:password@ becomes user:***@)."""
    scheme, sep, rest = url.partition("://")
    hostport, slash, path = rest.partition("/")
    userinfo, at, host = hostport.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


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


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
        default="", metadata={"help": "Ollama base URL, the one upstream when there is no "
                                      "--upstreams-file (default: from OLLAMA_HOST, as Ollama's "
                                      "CLI reads it, else http://127.0.0.1:11434)"})
    upstreams_file: str = field(default="", metadata={
        "help": "TOML file of upstreams (Ollama hosts, OpenAI-compatible servers: URL, key "
                "source, models, slots, weight, priority) and model aliases, reloaded when it "
                "changes; replaces --ollama-url"})
    failover_timeout: float = field(default=30.0, metadata={
        "help": "seconds an upstream gets to send a call's first token while another healthy "
                "upstream could take the call; then the call moves on (the last candidate gets "
                "the whole --first-token-timeout); per upstream: failover_timeout in the "
                "upstreams file"})
    connect_timeout: float = field(default=5.0, metadata={
        "help": "seconds to connect to Ollama"})
    first_token_timeout: float = field(default=300.0, metadata={
        "help": "seconds to wait for the first chunk (covers queueing and model load); "
                "a call's own deadline replaces it"})
    idle_timeout: float = field(default=60.0, metadata={
        "help": "seconds allowed between two chunks"})
    upstream_ca_file: str = field(default="", metadata={
        "help": "PEM CA bundle that verifies an https:// upstream's certificate (default: "
                "the system's CAs)"})
    unary_timeout: float = field(default=120.0, metadata={
        "help": "seconds an upstream call of ListModels or Embed may take in all (a call's "
                "own deadline, when shorter, wins)"})
    max_message_bytes: int = field(default=32 << 20, metadata={
        "help": "largest gRPC message accepted or sent, in bytes"})
    max_prompt_bytes: int = field(default=1 << 20, metadata={
        "help": "largest prompt (or total chat text, embed inputs, or JSON Schema text), "
                "in bytes"})
    max_images_bytes: int = field(default=16 << 20, metadata={
        "help": "largest total image payload per request, in bytes"})
    max_concurrent_streams: int = field(default=2048, metadata={
        "help": "HTTP/2 concurrent streams per client connection"})
    max_pending_calls: int = field(default=8192, metadata={
        "help": "calls per method grpc core may queue, over all connections, before the "
                "server picks them up; past it grpc cancels new calls (CANCELLED, no details, "
                "not logged) before admission can refuse them with RESOURCE_EXHAUSTED"})
    upstream_connections: int = field(default=1000, metadata={
        "help": "size of the connection pool to Ollama"})
    health_interval: float = field(default=5.0, metadata={
        "help": "seconds between upstream health probes"})
    shutdown_grace: float = field(default=30.0, metadata={
        "help": "seconds in-flight calls get to finish on SIGTERM/SIGINT"})
    # -- behind a load balancer ----------------------------------------------------
    drain_delay: float = field(default=0.0, metadata={
        "help": "seconds, at the start of the shutdown grace, during which a replica that "
                "got SIGTERM/SIGINT already reports NOT_SERVING but still takes new calls, "
                "so that a load balancer's health checks take it out before it stops "
                "accepting them (calls that reach a stopping gRPC server are held until the "
                "drain is over, then cancelled); set it to the balancer's detection time "
                "(deploy/haproxy.cfg: 2); 0 = stop taking calls at once"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(default="text", metadata={
        "help": "text (one readable line per event) or json (one JSON object per line)"})
    metrics_listen: str = field(default="", metadata={
        "help": "host:port to serve Prometheus metrics on (GET /metrics); empty = off"})
    health_listen: str = field(default="", metadata={
        "help": "host:port for a second, plaintext gRPC server with grpc.health.v1.Health "
                "only (names liveness, readiness, \"\"), open to probes without credentials, "
                "as kubelet's gRPC probe needs; no reflection, no model calls. It carries no "
                "prompts or answers, so a non-loopback address needs no --insecure; "
                "empty = off"})
    max_connection_age: float = field(default=1800.0, metadata={
        "help": "seconds a client connection may live (gRPC's MAX_CONNECTION_AGE, with its "
                "own +/-10%% jitter); then the server asks the client to reconnect, so "
                "long-lived connections spread over new replicas; 0 = for ever"})
    max_connection_age_grace: float = field(default=600.0, metadata={
        "help": "seconds the calls still running on an aged connection get to finish "
                "(MAX_CONNECTION_AGE_GRACE): long enough for a generation; a stream still "
                "running then ends UNAVAILABLE (resumable ones resume on a new connection); "
                "0 = as long as they run"})
    initial_metadata: str = field(default="first-token", metadata={
        "help": "when a call's response headers (initial metadata, x-request-id) go out: "
                "first-token = with its first message (a model call's first Token), and a "
                "call that fails before it ends with its status alone (trailers-only), "
                "which a gRPC client's retry policy may send to another replica; early = "
                "while the upstream request is made (no client retry can follow: gRPC "
                "commits a call when its headers arrive)"})
    workers: int = field(default=1, metadata={
        "help": "server processes sharing the port (SO_REUSEPORT, Linux); 0 = one per usable "
                "CPU; the admission limits apply per worker unless --redis-url shares them"})
    load_reports: bool = field(default=True, metadata={
        "help": "per-call load reports (ORCA: an endpoint-load-metrics-bin trailer on every "
                "model call, with model calls in flight over --max-streams, calls and errors "
                "per second, tokens per second, CPU), read by gRPC clients whose "
                "weighted_round_robin policy then sends fewer calls to busier replicas; "
                "about 4 us per call"})
    load_report_window: float = field(default=10.0, metadata={
        "help": "seconds: the time constant of the load reports' averages (calls in flight, "
                "calls, errors and tokens per second); longer is steadier, shorter follows a "
                "change sooner. Make it several times a typical call's length"})
    # -- resumable streams ----------------------------------------------------
    detach_grace: float = field(default=60.0, metadata={
        "help": "seconds a resumable stream goes on generating with nobody reading it "
                "(its caller went away, or it was started with Start); then it is "
                "cancelled upstream. A request may ask for less (resumable.detach_grace), "
                "never more"})
    resume_retention: float = field(default=600.0, metadata={
        "help": "seconds a finished resumable stream is kept for Resume"})
    resume_max_stream_bytes: int = field(default=8 << 20, metadata={
        "help": "bytes one resumable stream may hold (the engine's frames); a longer answer "
                "ends with RESOURCE_EXHAUSTED"})
    redis_url: str = field(default="", metadata={
        "help": "Redis URL (redis://host:port/db, rediss://, unix://) shared by replicas and "
                "--workers processes: the admission limits and token budgets hold across "
                "all of them, and resumable streams are mirrored there, so any of them "
                "serves Resume and Cancel; empty = this process's memory only"})
    redis_lease_ttl: float = field(default=15.0, metadata={
        "help": "with --redis-url: seconds a model call's place in the shared concurrency "
                "limits outlives its replica's last refresh (every third of it), so the calls "
                "of a replica that died stop counting after at most this long"})
    redis_down_streams: str = field(default="local", metadata={
        "help": "with --redis-url, while Redis is unreachable: the concurrency limits are "
                "applied in each process (local), not at all (open), or calls refused "
                "UNAVAILABLE (closed)"})
    redis_down_rate: str = field(default="local", metadata={
        "help": "with --redis-url, while Redis is unreachable: request rates are limited in "
                "each process (local), not at all (open), or calls refused (closed)"})
    redis_down_budgets: str = field(default="closed", metadata={
        "help": "with --redis-url, while Redis is unreachable: callers with token budgets "
                "are refused UNAVAILABLE (closed), served uncounted (open), or counted in "
                "each process (local)"})
    resume_max_bytes: int = field(default=512 << 20, metadata={
        "help": "bytes all resumable streams may hold together; finished ones are dropped "
                "oldest first to make room, and a start with no room is refused with "
                "RESOURCE_EXHAUSTED"})
    # -- who may call ---------------------------------------------------------
    tls_cert: str = field(default="", metadata={
        "help": "PEM certificate chain of the server; enables TLS"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of the server"})
    tls_client_ca: str = field(default="", metadata={
        "help": "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"})
    tls_allowed_clients: str = field(default="", metadata={
        "help": "comma-separated patterns of client certificate CN/SAN allowed in (mTLS)"})
    callers_file: str = field(default="", metadata={
        "help": "TOML file of callers: bearer tokens, allowed models/methods, limits "
                "(reloaded when it changes); tokens may also come from TOKENWIRE_AUTH_TOKENS"})
    open_health: bool = field(default=False, metadata={
        "help": "leave health checks and reflection open to callers without credentials"})
    insecure: bool = field(default=False, metadata={
        "help": "allow plaintext on a non-loopback address"})
    # -- admission ------------------------------------------------------------
    max_streams: int = field(default=1024, metadata={
        "help": "concurrent model calls (Generate, Chat, Complete, Embed) in all"})
    max_streams_per_caller: int = field(default=256, metadata={
        "help": "concurrent model calls per identified caller (bearer token or client "
                "certificate)"})
    max_streams_per_peer: int = field(default=0, metadata={
        "help": "concurrent model calls per peer address, for anonymous callers (no "
                "authentication configured); 0 = none, only --max-streams: an address is "
                "not an identity, every service behind one NAT, node or sidecar shares it"})
    rate: float = field(default=0.0, metadata={
        "help": "requests per second per identified caller (token bucket); 0 = no limit"})
    rate_per_peer: float = field(default=0.0, metadata={
        "help": "requests per second per peer address, for anonymous callers (token "
                "bucket); 0 = no limit"})
    burst: int = field(default=20, metadata={
        "help": "token bucket size for --rate and --rate-per-peer"})
    queue_timeout: float = field(default=0.0, metadata={
        "help": "seconds a call over the concurrency limits may wait for a slot; 0 = refuse"})
    max_messages: int = field(default=1000, metadata={
        "help": "chat messages per request"})
    max_output_tokens: int = field(default=0, metadata={
        "help": "cap on tokens generated per request (applied when a request sets none); "
                "0 = no cap"})
    # -- upstream faults ------------------------------------------------------
    upstream_retries: int = field(default=2, metadata={
        "help": "retries of a failed upstream call before its first token (backoff, "
                "never past the deadline)"})
    retry_backoff: float = field(default=0.2, metadata={
        "help": "first retry delay in seconds (doubles each time)"})
    breaker_threshold: int = field(default=5, metadata={
        "help": "consecutive upstream failures that open the circuit; 0 = no breaker"})
    breaker_cooldown: float = field(default=5.0, metadata={
        "help": "seconds the circuit stays open before a trial call"})
    # -- tracing --------------------------------------------------------------
    otlp_endpoint: str = field(default="", metadata={
        "help": "OpenTelemetry collector to export traces to over OTLP/gRPC "
                "(http://host:4317, https:// for TLS): a span per call, its parent the "
                "caller's W3C traceparent, and a GenAI span per model call whose "
                "traceparent goes to the engine; needs the tracing extra (pip install "
                "'tokenwire[tracing]'); empty = OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                "OTEL_EXPORTER_OTLP_ENDPOINT when set (unless OTEL_SDK_DISABLED=true), "
                "else off"})

    def resolved_ollama_url(self) -> str:
        return self.ollama_url or ollama_url_from_env(os.environ.get("OLLAMA_HOST"))

    def public(self) -> dict[str, object]:
        """Every setting, the Ollama URL without its password; tokens never appear (they
        live in the callers file or TOKENWIRE_AUTH_TOKENS, which are not settings)."""
        values = dataclasses.asdict(self)
        values["ollama_url"] = redact_url(self.resolved_ollama_url())
        values["redis_url"] = redact_url(self.redis_url)
        values["otlp_endpoint"] = redact_url(self.otlp_endpoint)
        return values

    def describe(self) -> str:
        """One line per setting, as ``public`` gives them."""
        return "\n".join(f"  {k:<24} {v}" for k, v in self.public().items())

    def listen_is_loopback(self) -> bool:
        host = self.listen.rpartition(":")[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def _convert(kind: type, raw: str | None) -> object:
    if kind is bool:
        lowered = (raw or "").strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return kind(raw)


def _valid_listen(hostport: str) -> bool:
    host, sep, port = hostport.rpartition(":")
    return bool(sep and host) and port.isdigit() and int(port) < 65536


def _port(hostport: str) -> str:
    return hostport.rpartition(":")[2] if hostport else ""


def _tracing_settings(parser: argparse.ArgumentParser, settings: Settings,
                      env: Mapping[str, str]) -> Settings:
    """The OTLP endpoint from the flag or the standard variables, checked."""
    endpoint = settings.otlp_endpoint or endpoint_from_env(env)
    if not endpoint:
        return settings
    if not endpoint.startswith(("http://", "https://")):
        parser.error(f"--otlp-endpoint {redact_url(endpoint)!r} needs its scheme: "
                     "http://host:4317 (plaintext) or https://host:4317 (TLS)")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol:
            if protocol != "grpc":
                parser.error(f"{name}={protocol!r}: tokenwire exports traces over OTLP/gRPC "
                             "only; point it at the collector's gRPC port (4317) and unset "
                             f"{name} or set it to grpc")
            break
    if importlib.util.find_spec(_TRACING_NEEDS.rpartition(".")[0]) is None:
        parser.error("tracing (--otlp-endpoint, or OTEL_EXPORTER_OTLP_ENDPOINT) needs the "
                     "OpenTelemetry SDK and OTLP exporter: pip install 'tokenwire[tracing]'")
    return dataclasses.replace(settings, otlp_endpoint=endpoint)


def _typed(flag: str, value: object) -> str:
    """A built-in default as one would type it: ``--no-insecure`` for a boolean flag,
    ``''`` for an empty string, ``30`` for 30.0. (The built-in one, not what a TOKENWIRE_*
    variable set: --help never shows a value taken from the environment.)"""
    if isinstance(value, bool):
        return flag if value else "--no-" + flag.removeprefix("--")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return shlex.quote(str(value))


def _version() -> str:
    try:
        return importlib.metadata.version("tokenwire")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def parse_settings(argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over TOKENWIRE_* variables, which win over defaults."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="tokenwire-server",
        description="gRPC gateway that streams LLM tokens from Ollama.",
        epilog="Each flag can also be set by its TOKENWIRE_* environment variable, "
               "e.g. --idle-timeout by TOKENWIRE_IDLE_TIMEOUT. The defaults shown are the "
               "built-in ones; the values in effect are printed at start.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        env_name = _ENV_PREFIX + f.name.upper()
        kind = type(getattr(defaults, f.name))
        raw = env.get(env_name)
        try:
            default = _convert(kind, raw) if raw not in (None, "") else getattr(defaults, f.name)
        except ValueError:
            parser.error(f"{env_name}={raw!r} is not a valid {kind.__name__}")
        flag = "--" + f.name.replace("_", "-")
        shown = _typed(flag, getattr(defaults, f.name)).replace("%", "%%")
        help_text = f"{f.metadata['help']} [env {env_name}; default {shown}]"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)
    args = parser.parse_args(argv)
    settings = Settings(**vars(args))
    problems = [
        name for name in ("connect_timeout", "first_token_timeout", "idle_timeout",
                          "unary_timeout", "failover_timeout",
                          "health_interval", "max_message_bytes", "max_prompt_bytes",
                          "upstream_connections", "max_concurrent_streams", "max_pending_calls",
                          "max_streams", "max_streams_per_caller", "burst", "max_messages",
                          "detach_grace", "resume_retention", "resume_max_stream_bytes",
                          "resume_max_bytes", "redis_lease_ttl", "load_report_window")
        if getattr(settings, name) <= 0
    ] + [
        name for name in ("rate", "rate_per_peer", "max_streams_per_peer", "queue_timeout",
                          "max_connection_age", "max_connection_age_grace",
                          "max_output_tokens", "upstream_retries",
                          "retry_backoff", "breaker_threshold", "breaker_cooldown", "workers",
                          "drain_delay")
        if getattr(settings, name) < 0
    ]
    if problems:
        parser.error("out of range (must be positive, or not negative): "
                     + ", ".join("--" + p.replace("_", "-") for p in problems))
    if settings.workers == 0:
        settings = dataclasses.replace(settings, workers=usable_cpus())
    if settings.metrics_listen and not _valid_listen(settings.metrics_listen):
        parser.error(f"--metrics-listen {settings.metrics_listen!r} is not host:port "
                     "(e.g. 127.0.0.1:9464, or 0.0.0.0:9464 for every interface)")
    if settings.health_listen and not _valid_listen(settings.health_listen):
        parser.error(f"--health-listen {settings.health_listen!r} is not host:port "
                     "(e.g. 0.0.0.0:8081, reachable by kubelet's probes)")
    if settings.health_listen and _port(settings.health_listen) in {
            _port(settings.listen), _port(settings.metrics_listen)} - {"0", ""}:
        parser.error(f"--health-listen {settings.health_listen!r} needs a port of its own, "
                     "not the one of --listen or --metrics-listen")
    if settings.resume_max_stream_bytes > settings.resume_max_bytes:
        parser.error("--resume-max-stream-bytes is over --resume-max-bytes: no resumable "
                     "stream could start")
    if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://",
                                                                  "unix://")):
        parser.error(f"--redis-url {redact_url(settings.redis_url)!r} is not a Redis URL "
                     "(redis://host:6379/0, rediss:// for TLS, or unix:///path/to/socket)")
    for name in ("redis_down_streams", "redis_down_rate", "redis_down_budgets"):
        if getattr(settings, name) not in ("local", "open", "closed"):
            parser.error(f"--{name.replace('_', '-')} must be local, open or closed, not "
                         f"{getattr(settings, name)!r}")
    settings = _tracing_settings(parser, settings, env)
    if settings.initial_metadata not in ("first-token", "early"):
        parser.error(f"--initial-metadata must be first-token or early, not "
                     f"{settings.initial_metadata!r}")
    if settings.upstreams_file and settings.ollama_url:
        parser.error("--ollama-url and --upstreams-file: set one (the file names every "
                     "upstream, Ollama hosts included)")
    if settings.log_format not in ("text", "json"):
        parser.error(f"--log-format must be text or json, not {settings.log_format!r}")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.error("--log-level must be DEBUG, INFO, WARNING or ERROR")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if (settings.tls_client_ca or settings.tls_allowed_clients) and not settings.tls_cert:
        parser.error("--tls-client-ca/--tls-allowed-clients need TLS: set --tls-cert and "
                     "--tls-key")
    if not settings.tls_cert and not settings.insecure and not settings.listen_is_loopback():
        parser.error(f"refusing to serve plaintext on {settings.listen}, which is not a "
                     "loopback address: anyone on the network could read prompts and answers. "
                     "Set --tls-cert/--tls-key, or pass --insecure if a proxy in front "
                     "terminates TLS")
    return settings
