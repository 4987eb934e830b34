"""The upstreams file (``--upstreams-file``): the engines the gateway routes over.

A TOML file, reloaded when it changes (a reload that does not read well is logged and
the previous configuration kept)::

    [upstreams.gpu1]
    kind = "ollama"                  # "ollama" or "openai" (required)
    url = "http://10.0.0.5:11434"    # user:password@ in it becomes basic auth (Ollama)
    discover = true                  # serve the models its model list shows, refreshed
    discover_interval = 60           #   every discover_interval seconds (default 60)
    slots = 4                        # calls it takes at once (default 1)
    weight = 1.0                     # share of the calls among equals (default 1)
    priority = 0                     # lower is preferred: local 0, hosted 10 (default 0)
    failover_timeout = 30            # seconds for its first token before a call that
                                     #   has another healthy upstream moves on
                                     #   (default --failover-timeout)

    [upstreams.hosted]
    kind = "openai"
    url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"   # or api_key_file = "/run/secrets/openai"
    models = ["gpt-4o-mini", "gpt-4.1*"]   # names or fnmatch patterns it serves
    priority = 10

    [aliases]                        # one public name, served by several upstreams
    "chat-small" = [{upstream = "gpu1", model = "smollm2:135m"},
                    {upstream = "hosted", model = "gpt-4o-mini"}]

A key never goes into the file (nor into a flag): the file names where it is, and the
key is read when the upstream is built (``_factory.read_api_key``). Every problem is
reported with the file, the table and the key, and nothing of a key's value.
``--ollama-url`` without a file is the one-upstream shortcut (``single_upstream``).
"""

from __future__ import annotations

import logging
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._config import redact_url

__all__ = ["AliasTarget", "UpstreamSpec", "UpstreamsConfig", "UpstreamsFile",
           "UpstreamsFileError", "is_pattern", "parse_upstreams", "single_upstream"]

log = logging.getLogger("tokenwire.service")

KINDS = ("ollama", "openai")
#: The name an upstream gets from ``--ollama-url`` (the shortcut without a file).
SHORTCUT_NAME = "ollama"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_KEYS = frozenset({"kind", "url", "api_key_env", "api_key_file", "models", "discover",
                   "discover_interval", "slots", "weight", "priority", "failover_timeout",
                   "flavor", "ca_file"})
#: The OpenAI-compatible servers whose options beyond the standard set are known.
FLAVORS = ("openai", "llama.cpp", "vllm")
#: Keys that would hold a secret: refused with a message saying where keys go instead.
_SECRET_KEYS = frozenset({"api_key", "key", "token", "password", "secret", "bearer",
                          "authorization"})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_MODEL = 200


class UpstreamsFileError(ValueError):
    """An upstreams file (or one of its upstreams) that cannot be used; the message names
    the file, the table and the key."""


def is_pattern(name: str) -> bool:
    """Whether a ``models`` entry is an fnmatch pattern rather than one name."""
    return any(c in name for c in "*?[")


@dataclass(frozen=True)
class UpstreamSpec:
    """One ``[upstreams.<name>]`` table, checked."""

    name: str
    kind: str
    #: As written: may hold user:password@ (shown only through redact_url).
    url: str = field(repr=False)
    models: tuple[str, ...] = ()
    discover: bool = False
    discover_interval: float = 60.0
    slots: int = 1
    weight: float = 1.0
    priority: int = 0
    #: None: ``--failover-timeout``.
    failover_timeout: float | None = None
    api_key_env: str = ""
    api_key_file: str = ""
    #: kind openai: which server's option names it takes (FLAVORS).
    flavor: str = "openai"
    #: A PEM CA bundle that verifies its https:// certificate ("": --upstream-ca-file, or
    #: the system's).
    ca_file: str = ""
    #: The file it came from ("" for the --ollama-url shortcut), for messages.
    source: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        return f"{self.source}: [upstreams.{self.name}]" if self.source else (
            f"upstream '{self.name}'")

    @property
    def connection(self) -> tuple[str, str, str, str, str, str]:
        """What the backend object is built from: when these stay the same across a
        reload, the upstream keeps its backend (connections, breaker, in-flight calls)."""
        return (self.kind, self.url, self.api_key_env, self.api_key_file, self.flavor,
                self.ca_file)

    def describe(self) -> str:
        """One line for the printed configuration: never a key, never a password."""
        models = (f"discover (every {self.discover_interval:g}s)" if self.discover
                  else ", ".join(self.models))
        key = ("env " + self.api_key_env if self.api_key_env
               else "file " + self.api_key_file if self.api_key_file else "none")
        timeout = "" if self.failover_timeout is None else (
            f" failover_timeout={self.failover_timeout:g}s")
        return (f"{self.name}: {self.kind} {redact_url(self.url)} models=[{models}] "
                f"slots={self.slots} weight={self.weight:g} priority={self.priority}"
                f"{timeout} key={key}")


@dataclass(frozen=True)
class AliasTarget:
    """One upstream of an alias, and the model name that upstream receives."""

    upstream: str
    model: str


@dataclass(frozen=True)
class UpstreamsConfig:
    upstreams: tuple[UpstreamSpec, ...]
    #: Public name -> its targets, in the file's order.
    aliases: Mapping[str, tuple[AliasTarget, ...]] = field(default_factory=dict)
    #: The file ("" for the --ollama-url shortcut).
    source: str = ""

    def describe(self) -> list[str]:
        lines = [f"upstreams from {self.source}:" if self.source else "upstream:"]
        lines += ["  " + spec.describe() for spec in self.upstreams]
        for alias, targets in self.aliases.items():
            lines.append(f"  alias {alias}: " + ", ".join(
                f"{t.upstream} ({t.model})" for t in targets))
        return lines

    def public(self) -> dict[str, object]:
        """For the JSON configuration record: as ``describe``, never a key."""
        return {
            "source": self.source,
            "upstreams": [{
                "name": s.name, "kind": s.kind, "url": redact_url(s.url),
                "models": "discover" if s.discover else list(s.models), "slots": s.slots,
                "weight": s.weight, "priority": s.priority,
                "key": ("env" if s.api_key_env else "file" if s.api_key_file else "none"),
            } for s in self.upstreams],
            "aliases": {a: [[t.upstream, t.model] for t in ts] for a, ts in self.aliases.items()},
        }


def single_upstream(url: str) -> UpstreamsConfig:
    """``--ollama-url`` alone: one Ollama that is asked for every model."""
    return UpstreamsConfig((UpstreamSpec(SHORTCUT_NAME, "ollama", url, models=("*",)),))


# -- parsing ---------------------------------------------------------------------------


def parse_upstreams(text: str, source: str) -> UpstreamsConfig:
    """Reads and checks an upstreams file's text; raises UpstreamsFileError naming the
    file, the table and the key of the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UpstreamsFileError(f"{source}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"upstreams", "aliases"})
    if unknown:
        raise UpstreamsFileError(
            f"{source}: unknown top-level key {unknown[0]!r}; the file has [upstreams.<name>] "
            "tables and an [aliases] table")
    tables = data.get("upstreams")
    if not isinstance(tables, dict) or not tables:
        raise UpstreamsFileError(
            f"{source}: no upstreams; add at least one [upstreams.<name>] table with kind "
            "and url")
    specs = tuple(_upstream(name, entry, source) for name, entry in tables.items())
    aliases = _aliases(data.get("aliases", {}), {s.name for s in specs}, source)
    return UpstreamsConfig(specs, aliases, source)


def _upstream(name: str, entry: Any, source: str) -> UpstreamSpec:
    where = f"{source}: [upstreams.{name}]"
    if not _NAME.fullmatch(name):
        raise UpstreamsFileError(
            f"{where}: the name must be 1-63 letters, digits, '_', '.' or '-', starting with "
            "a letter or digit (it names the upstream in usage, metrics and logs)")
    if not isinstance(entry, dict):
        raise UpstreamsFileError(f"{where}: must be a table (kind = ..., url = ...)")
    for key in entry:
        if key.lower() in _SECRET_KEYS:
            raise UpstreamsFileError(
                f"{where} {key}: a key never goes into the upstreams file; name where it is "
                "with api_key_env = \"VARIABLE\" or api_key_file = \"/path\"")
        if key not in _KEYS:
            raise UpstreamsFileError(f"{where} {key}: unknown key; known keys: "
                                     + ", ".join(sorted(_KEYS)))
    kind = entry.get("kind")
    if kind not in KINDS:
        raise UpstreamsFileError(f"{where} kind: must be one of {', '.join(KINDS)}"
                                 + ("" if kind is None else f", not {_show(kind)}"))
    url = _url(entry.get("url"), f"{where} url")
    api_key_env = _string(entry, "api_key_env", where)
    api_key_file = _string(entry, "api_key_file", where)
    if api_key_env and not _ENV_NAME.fullmatch(api_key_env):
        raise UpstreamsFileError(f"{where} api_key_env: must be the name of an environment "
                                 "variable (letters, digits, '_'), not its value")
    if api_key_env and api_key_file:
        raise UpstreamsFileError(f"{where}: set api_key_env or api_key_file, not both")
    if (api_key_env or api_key_file) and kind == "ollama":
        raise UpstreamsFileError(
            f"{where} {'api_key_env' if api_key_env else 'api_key_file'}: the ollama kind "
            "takes no key (put user:password@ in its url for basic auth)")
    if api_key_file and not Path(api_key_file).is_absolute() and source:
        api_key_file = str(Path(source).parent / api_key_file)
    discover = entry.get("discover", False)
    if not isinstance(discover, bool):
        raise UpstreamsFileError(f"{where} discover: must be true or false")
    models: tuple[str, ...] = ()
    if "models" in entry:
        if discover:
            raise UpstreamsFileError(f"{where}: set models or discover = true, not both")
        models = _models(entry["models"], f"{where} models")
    elif not discover:
        raise UpstreamsFileError(
            f"{where}: say which models it serves: models = [\"name\", \"pattern*\"], or "
            "discover = true to take them from its model list")
    if "discover_interval" in entry and not discover:
        raise UpstreamsFileError(f"{where} discover_interval: applies with discover = true")
    failover = entry.get("failover_timeout")
    flavor = entry.get("flavor", "openai")
    if "flavor" in entry and kind != "openai":
        raise UpstreamsFileError(f"{where} flavor: applies to kind = \"openai\" only")
    if flavor not in FLAVORS:
        raise UpstreamsFileError(f"{where} flavor: must be one of {', '.join(FLAVORS)}, not "
                                 f"{_show(flavor)}")
    ca_file = _string(entry, "ca_file", where)
    if ca_file and not Path(ca_file).is_absolute() and source:
        ca_file = str(Path(source).parent / ca_file)
    if ca_file and not Path(ca_file).is_file():
        raise UpstreamsFileError(f"{where} ca_file: no such file: {ca_file}")
    return UpstreamSpec(
        name=name, kind=kind, url=url, models=models, discover=discover,
        discover_interval=_number(entry, "discover_interval", where, 60.0, positive=True),
        slots=_integer(entry, "slots", where, 1, minimum=1),
        weight=_number(entry, "weight", where, 1.0, positive=True),
        priority=_integer(entry, "priority", where, 0, minimum=0),
        failover_timeout=None if failover is None else _number(
            entry, "failover_timeout", where, 0.0, positive=True),
        api_key_env=api_key_env, api_key_file=api_key_file, flavor=flavor, ca_file=ca_file,
        source=source,
    )


def _aliases(table: Any, names: set[str], source: str) -> dict[str, tuple[AliasTarget, ...]]:
    if not isinstance(table, dict):
        raise UpstreamsFileError(f"{source}: [aliases] must be a table of "
                                 "name = [{upstream = ..., model = ...}, ...]")
    aliases: dict[str, tuple[AliasTarget, ...]] = {}
    for alias, targets in table.items():
        where = f"{source}: [aliases] {_show(alias)}"
        if not alias.strip() or len(alias) > _MAX_MODEL or is_pattern(alias):
            raise UpstreamsFileError(f"{where}: an alias is one model name (1-{_MAX_MODEL} "
                                     "characters, no *, ? or [)")
        if not isinstance(targets, list) or not targets:
            raise UpstreamsFileError(f"{where}: must be a non-empty list of "
                                     "{upstream = \"<name>\", model = \"<its model>\"}")
        seen: set[str] = set()
        checked = []
        for i, target in enumerate(targets):
            at = f"{where}[{i}]"
            if not isinstance(target, dict):
                raise UpstreamsFileError(f"{at}: must be {{upstream = ..., model = ...}}")
            extra = sorted(set(target) - {"upstream", "model"})
            if extra:
                raise UpstreamsFileError(f"{at} {extra[0]}: unknown key; an alias target has "
                                         "upstream and model")
            upstream = target.get("upstream")
            if not isinstance(upstream, str) or upstream not in names:
                raise UpstreamsFileError(
                    f"{at} upstream: {_show(upstream)} is not an upstream of this file; "
                    f"known: {', '.join(sorted(names))}")
            if upstream in seen:
                raise UpstreamsFileError(f"{at} upstream: {upstream!r} is listed twice")
            seen.add(upstream)
            model = target.get("model")
            if not isinstance(model, str) or not model.strip() or len(model) > _MAX_MODEL:
                raise UpstreamsFileError(f"{at} model: the model name {upstream!r} knows "
                                         f"it by (1-{_MAX_MODEL} characters)")
            checked.append(AliasTarget(upstream, model))
        aliases[alias] = tuple(checked)
    return aliases


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UpstreamsFileError(f"{where}: required, e.g. \"http://10.0.0.5:11434\"")
    url = str(value).strip().rstrip("/")
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        raise UpstreamsFileError(f"{where}: {shown!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamsFileError(f"{where}: {shown!r} must be http://host[:port][/path] or "
                                 "https://...")
    return url


def _models(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise UpstreamsFileError(f"{where}: must be a non-empty list of model names or "
                                 "fnmatch patterns, e.g. [\"smollm2:*\"]")
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item) > _MAX_MODEL:
            raise UpstreamsFileError(f"{where}: {_show(item)} is not a model name (a string "
                                     f"of 1-{_MAX_MODEL} characters)")
    return tuple(value)


def _string(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str) or (key in entry and not value.strip()):
        raise UpstreamsFileError(f"{where} {key}: must be a non-empty string")
    return str(value).strip()


def _integer(entry: dict[str, Any], key: str, where: str, default: int, *,
             minimum: int) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UpstreamsFileError(f"{where} {key}: must be a whole number >= {minimum}")
    return value


def _number(entry: dict[str, Any], key: str, where: str, default: float, *,
            positive: bool) -> float:
    value = entry.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or (positive and value <= 0)):
        raise UpstreamsFileError(f"{where} {key}: must be a number > 0")
    return float(value)


# -- the file, watched ------------------------------------------------------------------


class UpstreamsFile:
    """An upstreams file and the configuration it holds; ``changed`` reads it again
    when its modification time, size or inode changed (a ConfigMap's symlink swap
    changes the inode)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._problem = ""  # the last problem logged: a file left broken is logged once
        config = self._read(initial=True)
        assert config is not None
        #: The configuration in force (the last one that read well).
        self.config: UpstreamsConfig = config

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self, *, initial: bool = False) -> UpstreamsConfig | None:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            text = self.path.read_text(encoding="utf-8")
            config = parse_upstreams(text, str(self.path))
        except (OSError, UnicodeDecodeError, UpstreamsFileError) as exc:
            problem = exc if isinstance(exc, UpstreamsFileError) else UpstreamsFileError(
                f"{self.path}: cannot read it ({exc})")
            if initial:
                raise problem from None
            self.rejected(problem)
            return None
        self._problem = ""
        return config

    def rejected(self, problem: Exception) -> None:
        """Logs why a new version of the file is not in force (once per problem)."""
        if str(problem) != self._problem:
            self._problem = str(problem)
            log.error("upstreams file not reloaded (keeping the previous one): %s", problem)

    def changed(self) -> UpstreamsConfig | None:
        """The file's new configuration when it changed and reads well; None when it did
        not change, or did and is bad (logged; the previous one stays in force)."""
        config = self._read()
        if config is not None and config != self.config:
            return config
        return None

    def accept(self, config: UpstreamsConfig) -> None:
        """Records ``config`` as in force (the router could build it)."""
        self.config = config
