"""Log set-up: human-readable lines (the default) or one JSON object per line.

JSON lines carry ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``message``, the
``worker`` index under ``--workers``, and the structured fields a record was given with
``extra={"fields": {...}}`` (the access log gives the bare method name, request id, caller,
outcome, the ErrorInfo reason of a failed call and ms, named as the metrics name them; the
configuration record gives the settings). Neither format ever holds prompt or
answer text: nothing logs it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["JsonFormatter", "setup_logging"]


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str, log_format: str, worker: int | None) -> None:
    """Logs to stderr at ``level`` in ``log_format`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = "" if worker is None else f" worker={worker}"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{tag} %(name)s "
                                               "%(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every request at INFO; the access log already covers calls.
    logging.getLogger("httpx").setLevel(logging.WARNING)
