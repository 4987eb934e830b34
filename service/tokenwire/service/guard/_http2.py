"""What grpc core lets through on the HTTP/2 side, and what we do about it.

Measured against grpcio 1.85 (README "Security and reliability" has the figures):

* **Header blocks before the SETTINGS ACK.** chttp2 applies the metadata hard limit
  of the settings the client has *acknowledged*. Until the client acknowledges the
  server's SETTINGS that is the HTTP/2 default, which grpc caps at 16 MiB per header
  block, and the server accepts up to ``grpc.max_concurrent_streams`` streams before
  the acknowledgement. The soft limit (``grpc.max_metadata_size``) still applies, but
  only as a random rejection with probability (size - soft) / (16 MiB - soft): about
  6 % for a 1 MiB block. So a client that never acknowledges gets calls with
  megabytes of metadata each into the server, and each stays alive waiting for a
  request message that never comes. No channel argument changes the pre-ACK limit.
  What we do: the guard refuses, at once, any call whose metadata exceeds grpc's own
  post-ACK hard limit (no well-behaved client can send such a call, so only such a
  client is refused), without waiting for its request message; the settings timeout
  closes a connection that has not acknowledged within ``SETTINGS_TIMEOUT_MS``.
* **Refused calls are garbage in a cycle.** grpc.aio's ``_find_method_handler`` leaves
  a reference cycle per call that holds its invocation metadata; only the cycle
  collector frees it, and ``_settle_gc`` runs the youngest generation every 20,000
  allocations instead of 700, so a few hundred refused 1 MiB calls stay in memory.
  :class:`GarbageSweep` collects them once refused metadata reaches a budget.
* **Freed memory glibc keeps.** A refused 1 MiB block is copied a few times on its
  way (HPACK buffer, metadata, Python strings) and freed. glibc serves the first such
  sizes with mmap and gives them back at once, but after the first free it raises
  its mmap threshold (up to 32 MiB) and serves them from its heaps, whose freed
  memory it keeps: the flood of issue #10 (100 MiB) then left 36-53 MiB of RSS behind,
  one connection sending 100 blocks 59-133 MiB, nearly all of it free (``malloc_trim``
  gave it back). :func:`settle_malloc` pins the threshold at glibc's initial 128 KiB,
  so large blocks keep going back to the kernel: 6-23 MiB and 33 MiB left. Nothing on
  the token path allocates that much at once.
* **Calls the application has not picked up yet.** grpc core queues calls that arrive
  faster than grpc.aio asks for them (it asks for one at a time). Past
  ``grpc.server.max_pending_requests`` (default 1000) it cancels new ones at random, and
  all of them past ``grpc.server.max_pending_requests_hard_limit`` (default 3000): the
  caller sees CANCELLED with no details and the call never reaches the guard, so it
  is neither refused with RetryInfo nor logged. A 2,000-call burst on one connection
  lost 8-11 % that way. The queue is per method (grpc.aio registers each one).
  ``--max-pending-calls`` sets both limits to one value: no random cancellations
  below it, so the guard's admission answers the overload.
"""

from __future__ import annotations

import ctypes
import gc
import platform
from collections.abc import Iterable

__all__ = ["MAX_METADATA_BYTES", "SETTINGS_TIMEOUT_MS", "GarbageSweep", "MetadataTooLarge",
           "core_options", "metadata_bytes", "settle_malloc"]

#: grpc's own limits on a call's metadata (its defaults, set explicitly so the guard's
#: check and grpc's agree): past the soft one grpc refuses calls at random, past the
#: hard one always, on connections whose client acknowledged the server's SETTINGS.
SOFT_METADATA_BYTES = 8 * 1024
MAX_METADATA_BYTES = 16 * 1024
#: A client must acknowledge the server's SETTINGS "immediately" (RFC 9113, 6.5.3);
#: one that has not done so this long after they were sent is closed (grpc's default
#: is 2 x the keepalive timeout, at least a minute).
SETTINGS_TIMEOUT_MS = 10_000
#: Bytes of refused metadata after which :class:`GarbageSweep` runs the collector.
SWEEP_BUDGET = 8 << 20
#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h) and its initial value.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024
#: What HPACK counts for each entry besides its name and value (RFC 7541, 4.1).
_ENTRY_OVERHEAD = 32


def core_options(max_pending_calls: int) -> list[tuple[str, int]]:
    """The grpc core channel arguments for the limits above."""
    return [
        ("grpc.max_metadata_size", SOFT_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.http2.settings_timeout", SETTINGS_TIMEOUT_MS),
        # Equal soft and hard limits: no random cancellations, one documented bound.
        ("grpc.server.max_pending_requests", max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", max_pending_calls),
    ]


def metadata_bytes(metadata: Iterable[tuple[str, str | bytes]] | None) -> int:
    """The size of a call's metadata as HPACK counts it. grpc's own count also includes
    the pseudo-headers and content-type, which Python does not see, so this is never
    more than what grpc compared with its limits."""
    return sum(len(key) + len(value) + _ENTRY_OVERHEAD for key, value in metadata or ())


class MetadataTooLarge(Exception):
    """A call whose metadata is over grpc's own hard limit (RESOURCE_EXHAUSTED)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.message = (f"the call's metadata is {size} bytes, over the limit of "
                        f"{MAX_METADATA_BYTES} bytes; send less metadata (an HTTP/2 "
                        "client that acknowledges the server's SETTINGS is held to "
                        "this limit by gRPC itself)")
        super().__init__(self.message)


class GarbageSweep:
    """Runs the cycle collector (the two young generations) once the metadata of
    refused calls adds up to ``budget`` bytes. Each refused call leaves its metadata
    in a reference cycle (see the module docstring); with the raised collection
    threshold nothing else would free a flood of them. The call being refused is
    still running, so its bytes count towards the next sweep; at most about
    ``budget`` bytes of refused metadata are left uncollected."""

    def __init__(self, budget: int = SWEEP_BUDGET) -> None:
        self._budget = budget
        self._owed = 0
        self.sweeps = 0

    def refused(self, size: int) -> None:
        self._owed += size
        if self._owed >= self._budget:
            self._owed = size
            self.sweeps += 1
            gc.collect()


def settle_malloc() -> bool:
    """Pins glibc's mmap threshold (see the module docstring); returns whether it did.
    Process-wide, so the server's entry point calls it, once; not glibc: nothing."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
