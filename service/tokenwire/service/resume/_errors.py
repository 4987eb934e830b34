"""Failures of resumable streams; ``_status.STATUS_TABLE`` gives each its status."""

from __future__ import annotations

__all__ = ["PositionOutOfRange", "ReplayedStatus", "ResumeError", "ResumeUnavailable",
           "RetentionFull", "StoreUnavailable", "StreamCancelled", "StreamNotFound",
           "StreamTooLarge"]


class ResumeError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StreamNotFound(ResumeError):
    """No stream of this caller has the id: never started, started by another caller
    (which is not revealed), or ended and gone (which is said)."""


class RetentionFull(ResumeError):
    """No room for one more resumable stream, even after dropping finished ones."""


class StreamTooLarge(ResumeError):
    """A stream outgrew the bytes one stream may hold (--resume-max-stream-bytes)."""


class StreamCancelled(ResumeError):
    """Stopped by Cancel, or because nobody read it within its detach grace."""


class PositionOutOfRange(ResumeError):
    """Resume asked for chunks past those the stream has produced."""


class ResumeUnavailable(ResumeError):
    """This server cannot keep resumable streams in its present configuration."""


class StoreUnavailable(ResumeError):
    """The shared store of resumable streams (Redis) cannot be reached now."""


class ReplayedStatus(ResumeError):
    """A status to end a call with as it is: a stream's own error status read back from
    Redis (as the replica that generated it sent it), or one built here."""

    def __init__(self, code: object, message: str,
                 trailing: tuple[tuple[str, str | bytes], ...]) -> None:
        super().__init__(message)
        self.code = code
        self.trailing = trailing
