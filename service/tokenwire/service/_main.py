"""``tokenwire-server`` entry point."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from ._config import parse_settings
from ._server import serve
from ._workers import WorkerLink, supervise

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    worker = WorkerLink.from_env(os.environ)  # set when a --workers supervisor started us
    tag = "" if worker is None else f" worker={worker.index}"
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s{tag} %(name)s %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO; the access log already covers calls.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if worker is None:  # workers have the supervisor's settings; it printed them
        print("tokenwire-server configuration:\n" + settings.describe(), file=sys.stderr,
              flush=True)
    if settings.workers > 1:
        return supervise(settings)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(serve(settings, worker))
    return uvloop.run(serve(settings, worker))


if __name__ == "__main__":
    sys.exit(main())
