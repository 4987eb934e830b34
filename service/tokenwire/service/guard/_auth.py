"""Who may call: bearer tokens, client certificates, per-caller policy.

Callers are described in a TOML file (``--callers-file``), reloaded when it
changes, without a restart::

    [callers.search-indexer]
    token_sha256 = "9f86d0…"        # or token = "…" (plain; prefer the digest)
    models = ["smollm2:*"]          # fnmatch patterns; default: every model (ListModels
                                    # shows only these; "x" and "x:latest" are one model)
    methods = ["Generate", "Chat"]  # default: every method
    max_streams = 4                 # concurrent model calls; default: --max-streams-per-caller
    rate = 2.0                      # requests per second, burst ``burst``; default: the flags'
    burst = 10
    tokens_per_minute = 60000       # token budgets (prompt + output), see guard/_budget.py;
    tokens_per_day = 5000000        # default: none
    max_output_tokens = 1024        # cap on a request's output tokens; default: the server's

    [callers.billing-svc]
    cert_names = ["billing.internal"]   # mTLS: client certificate CN or SAN

Tokens may also come from ``TOKENWIRE_AUTH_TOKENS`` as ``name=token,name=token``
(no per-caller policy there). A presented token is hashed and compared with
every known digest in constant time, so timing says nothing about which
token, or how much of one, matched.
"""

from __future__ import annotations

import contextvars
import fnmatch
import hashlib
import hmac
import logging
import os
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ._budget import Budget

__all__ = ["AuthError", "Caller", "CallerRegistry", "NotAllowed", "NotAuthenticated",
           "caller_var", "may_use_model", "principal_var"]

log = logging.getLogger("tokenwire.service")


class AuthError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotAuthenticated(AuthError):
    """No credentials, or ones this server does not know (UNAUTHENTICATED)."""


class NotAllowed(AuthError):
    """A known caller asked for a method or model it may not use (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Caller:
    name: str
    models: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("*",)
    max_streams: int | None = None
    rate: float | None = None
    burst: int | None = None
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    max_output_tokens: int | None = None
    token_digest: bytes = field(default=b"", repr=False)
    cert_names: tuple[str, ...] = ()

    @property
    def budget(self) -> Budget:
        return Budget(self.tokens_per_minute, self.tokens_per_day)

    def check(self, method: str, model: str | None) -> None:
        """Raises PERMISSION_DENIED-style AuthError when the policy says no."""
        short = method.rsplit("/", 1)[-1]
        # Resume and Cancel act on the caller's own streams: whoever may start one may.
        names = _STREAM_STARTERS if short in ("Resume", "Cancel") else (short,)
        if not any(fnmatch.fnmatchcase(n, p) for n in (short, *names) for p in self.methods):
            raise NotAllowed(f"caller '{self.name}' may not call {short}; allowed: "
                             f"{', '.join(self.methods)}")
        if model is not None and not self.allows_model(model):
            raise NotAllowed(f"caller '{self.name}' may not use model '{model}'; allowed: "
                             f"{', '.join(self.models)}")

    def allows_model(self, model: str) -> bool:
        """Whether the ``models`` patterns admit ``model``, under any of the names
        Ollama gives it (``tiny`` and ``tiny:latest`` are one model)."""
        if self.models == ("*",):
            return True
        return any(fnmatch.fnmatchcase(n, p) for n in _names(model) for p in self.models)


#: The methods that start resumable streams.
_STREAM_STARTERS = ("Generate", "Chat", "Start")


def _names(model: str) -> set[str]:
    """Ollama reads a name without a tag as ":latest": both spellings of one model."""
    if ":" not in model.rsplit("/", 1)[-1]:
        return {model, model + ":latest"}
    return {model, model.removesuffix(":latest")}


#: The caller of the current call, set by the guard (None: no authentication).
caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "tokenwire_caller", default=None)


#: Who the current call's caller is, for owning resumable streams: a caller's name, or
#: ``peer:<address>`` for an anonymous caller (what per-peer limits count by too).
principal_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "tokenwire_principal", default="-")


def may_use_model(model: str) -> bool:
    """Whether the current call's caller may use ``model`` (by its policy, the same
    rule that admits a model call); True when the server does not authenticate. For
    handlers, so that they need no auth logic of their own (ListModels filters by it)."""
    caller = caller_var.get()
    return caller is None or caller.allows_model(model)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _count(entry: dict[str, object], key: str, source: str, name: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{source}: caller '{name}': {key} must be a whole number of "
                         f"tokens, at least 1; got {value!r}")
    return value


def _parse_file(text: str, source: str) -> list[Caller]:
    data = tomllib.loads(text)
    callers = []
    for name, entry in (data.get("callers") or {}).items():
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: [callers.{name}] must be a table")
        if "token" in entry:
            digest = _digest(str(entry["token"]))
        elif "token_sha256" in entry:
            digest = bytes.fromhex(str(entry["token_sha256"]))
        else:
            digest = b""
        cert_names = tuple(str(n) for n in entry.get("cert_names", ()))
        if not digest and not cert_names:
            raise ValueError(f"{source}: caller '{name}' has neither token, token_sha256 "
                             "nor cert_names")
        callers.append(Caller(
            name=name,
            models=tuple(entry.get("models", ("*",))),
            methods=tuple(entry.get("methods", ("*",))),
            max_streams=entry.get("max_streams"),
            rate=entry.get("rate"),
            burst=entry.get("burst"),
            tokens_per_minute=_count(entry, "tokens_per_minute", source, name) or 0,
            tokens_per_day=_count(entry, "tokens_per_day", source, name) or 0,
            max_output_tokens=_count(entry, "max_output_tokens", source, name),
            token_digest=digest,
            cert_names=cert_names,
        ))
    return callers


def _parse_env(value: str) -> list[Caller]:
    callers = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, token = item.partition("=")
        if not sep or not name or not token:
            raise ValueError("TOKENWIRE_AUTH_TOKENS entries look like name=token")
        callers.append(Caller(name=name, token_digest=_digest(token)))
    return callers


class CallerRegistry:
    """Known callers; reloads ``path`` when its modification time changes
    (looked at no more than once a second)."""

    def __init__(self, path: str | None = None, env_tokens: str = "") -> None:
        self._path = Path(path) if path else None
        self._env = _parse_env(env_tokens) if env_tokens else []
        self._stamp: float | None = None
        self._checked = 0.0
        self._callers: list[Caller] = []
        self._reload(initial=True)

    @property
    def enabled(self) -> bool:
        """Configured (a callers file or env tokens), even with nobody listed yet:
        authentication is then on and fails closed."""
        return self._path is not None or bool(self._env)

    def _reload(self, *, initial: bool = False) -> None:
        callers = list(self._env)
        if self._path is not None:
            stamp = self._path.stat().st_mtime_ns
            if stamp == self._stamp and not initial:
                return
            try:
                callers += _parse_file(self._path.read_text(), str(self._path))
            except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
                if initial:
                    raise
                log.error("callers file %s not reloaded (keeping the previous one): %s",
                          self._path, exc)
                self._stamp = stamp
                return
            self._stamp = stamp
            if not initial:
                log.info("callers file %s reloaded: %d caller(s)", self._path, len(callers))
        self._callers = callers

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._path is not None and now - self._checked >= 1.0:
            self._checked = now
            try:
                self._reload()
            except OSError as exc:
                log.error("callers file %s unreadable (keeping the previous one): %s",
                          self._path, exc)

    def by_token(self, token: str) -> Caller | None:
        self._maybe_reload()
        presented = _digest(token)
        found = None
        for caller in self._callers:  # no early exit: constant time over all callers
            if caller.token_digest and hmac.compare_digest(presented, caller.token_digest):
                found = caller
        return found

    def by_cert(self, names: Iterable[str]) -> Caller | None:
        self._maybe_reload()
        wanted = set(names)
        for caller in self._callers:
            if wanted.intersection(caller.cert_names):
                return caller
        return None

    @staticmethod
    def env_tokens() -> str:
        return os.environ.get("TOKENWIRE_AUTH_TOKENS", "")
