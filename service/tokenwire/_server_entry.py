"""``tokenwire-server``'s entry point: makes sure the ``server`` extra is installed before
the gateway is imported.

``pip install tokenwire`` is the client alone (``tokenwire.client``, ``tokenwire.v1`` and
the ``tokenwire`` CLI); the gateway's dependencies (httpx, orjson, redis, prometheus-client,
uvloop, grpcio-reflection, ...) come with ``pip install 'tokenwire[server]'``. Without them
``tokenwire-server`` prints one line saying so and exits 2 (a usage error), instead of an
ImportError's traceback. This module lives outside ``tokenwire.service`` because importing
anything in that package imports the gateway.

It is also where gRPC's own settings that must be in place before grpcio loads are made:
see ``GRPC_EXPERIMENTS_DEFAULT``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from importlib import metadata

__all__ = ["GRPC_EXPERIMENTS_DEFAULT", "INSTALL_HINT", "main", "missing_server_requirements"]

#: gRPC core experiments the server turns off unless ``GRPC_EXPERIMENTS`` is set (set it,
#: even empty, to keep grpcio's own defaults). With these two off, the listener and its
#: connections use gRPC's long-standing iomgr TCP code instead of the EventEngine
#: endpoints that grpcio 1.85 enables by default: a written message is sent by the thread
#: that wrote it rather than handed to an EventEngine thread, so one token costs about one
#: thread switch instead of two. Measured (issue #14, 300 streams × 30 tokens/s, one
#: message per token, 2 shared cores): 10-15 % less CPU per token for tokenwire and for a
#: bare grpc.aio server alike. grpcio reads the variable once, when it loads, hence here.
GRPC_EXPERIMENTS_DEFAULT = "-event_engine_listener,-event_engine_for_all_other_endpoints"

EXTRA = "server"
INSTALL_HINT = "pip install 'tokenwire[server]'"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def missing_server_requirements(distribution: str = "tokenwire") -> list[str]:
    """The distributions of the ``server`` extra that are not installed, read from the
    installed package's metadata (so the list is the one pyproject.toml declares).

    A requirement with a further environment marker (uvloop's platform) is left out: the
    server runs without it. Empty when tokenwire is not installed as a distribution (a
    source tree on ``sys.path``); the import in ``main`` is then the check."""
    try:
        requires = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        if marker.strip().replace('"', "'") != f"extra == '{EXTRA}'":
            continue
        found = _NAME.match(spec.strip())
        if found is None:  # pragma: no cover - metadata written by a build backend
            continue
        try:
            metadata.distribution(found.group())
        except metadata.PackageNotFoundError:
            missing.append(found.group())
    return missing


def _refuse(what: str) -> int:
    print(f"tokenwire-server: the server's dependencies are not installed ({what}); "
          f"this is the client-only install. For the server: {INSTALL_HINT}",
          file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)  # before grpcio loads
    missing = missing_server_requirements()
    if missing:
        return _refuse("missing: " + ", ".join(missing))
    try:
        from tokenwire.service._main import main as serve
    except ModuleNotFoundError as exc:  # not installed from the wheel, without the extra
        if (exc.name or "tokenwire").partition(".")[0] == "tokenwire":
            raise
        return _refuse(f"no module named {exc.name!r}")
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
