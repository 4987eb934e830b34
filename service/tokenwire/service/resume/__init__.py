"""Resumable streams: generation that outlives its caller, read again from any position.

    _log        StreamLog, a Relay that keeps every chunk, and the Cursors that read it
    _registry   the streams by id and owner: detach grace, retention, the byte bounds
    _errors     what can go wrong, each with its own status (``_status.STATUS_TABLE``)

The buffer lives in the serving process's memory (the embedded default). A stream's
chunks are kept as the relay's neutral events, not as messages: each reader groups
them by its own delivery mode, so positions (chunk indexes) stay exact whatever the
grouping.
"""

from ._errors import (
    PositionOutOfRange,
    ResumeError,
    ResumeUnavailable,
    RetentionFull,
    StreamCancelled,
    StreamNotFound,
    StreamTooLarge,
)
from ._log import Cursor, StreamLog
from ._registry import ResumableStream, Retention, Streams

__all__ = ["Cursor", "PositionOutOfRange", "ResumableStream", "ResumeError",
           "ResumeUnavailable", "Retention", "RetentionFull", "StreamCancelled", "StreamLog",
           "StreamNotFound", "StreamTooLarge", "Streams"]
