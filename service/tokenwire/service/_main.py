"""``tokenwire-server`` entry point."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from ._config import parse_settings
from ._server import serve

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO; the access log already covers calls.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    print("tokenwire-server configuration:\n" + settings.describe(), file=sys.stderr, flush=True)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
