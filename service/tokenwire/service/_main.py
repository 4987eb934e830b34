"""``tokenwire-server`` entry point."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from ._address import AddressUnusable, check_listen
from ._config import Settings, parse_settings
from ._logging import setup_logging
from ._server import serve, upstreams_of
from ._workers import WorkerLink, supervise
from .backends._upstreams import UpstreamsFileError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    worker = WorkerLink.from_env(os.environ)  # set when a --workers supervisor started us
    setup_logging(settings.log_level, settings.log_format,
                  None if worker is None else worker.index)
    if worker is None:  # workers have the supervisor's settings; it printed them
        try:
            _check_addresses(settings)
            upstreams, _ = upstreams_of(settings)
        except (AddressUnusable, UpstreamsFileError) as exc:
            print(f"tokenwire-server: error: {exc}", file=sys.stderr, flush=True)
            return 2
        if settings.log_format == "json":
            logging.getLogger("tokenwire.service").info(
                "configuration", extra={"fields": {"settings": settings.public(),
                                                   "upstreams": upstreams.public()}})
        else:
            print("tokenwire-server configuration:\n" + settings.describe() + "\n"
                  + "\n".join("  " + line for line in upstreams.describe()),
                  file=sys.stderr, flush=True)
    if settings.workers > 1:
        return supervise(settings)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(serve(settings, worker))
    return uvloop.run(serve(settings, worker))


def _check_addresses(settings: Settings) -> None:
    """One clear line, before anything starts, when an address cannot be listened on (in
    use, and by which process), rather than gRPC's "Failed to bind" and a traceback."""
    for address, flag in ((settings.listen, "--listen"),
                          (settings.health_listen, "--health-listen"),
                          (settings.metrics_listen, "--metrics-listen")):
        if address:
            check_listen(address, flag)


if __name__ == "__main__":
    sys.exit(main())
