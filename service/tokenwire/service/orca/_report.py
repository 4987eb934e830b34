"""Per-call load reports: ORCA's ``endpoint-load-metrics-bin`` trailer (gRFC A51).

grpcio has no ORCA server API in Python (the recorder of its C core is reachable from
C++ only), but a per-call report is nothing more than a serialized
``xds.data.orca.v3.OrcaLoadReport`` in the call's trailing metadata, so tokenwire
writes it itself. (grpcio's client core, on the other side, takes the trailer for its
own balancing policies and never shows it to Python code; ``grpcurl -v`` prints it.)
Clients with the ``weighted_round_robin`` policy (gRFC A58) read it when each call ends
and weigh each replica by ``rps_fractional / (application_utilization + eps /
rps_fractional * errorUtilizationPenalty)``.

The figures, one ``LoadMeter`` per server process (a ``--workers`` process reports
its own load, which is the load of the connections it holds):

    application_utilization   model calls in flight, averaged over the last seconds
                              (exponentially, time constant ``HORIZON``), over
                              ``--max-streams``
    rps_fractional            model calls received per second (same average)
    eps                       model calls per second that ended with a server-side
                              status (UNAVAILABLE, INTERNAL, RESOURCE_EXHAUSTED, ...)
    cpu_utilization           this process's CPU time per wall-clock second (a
                              fraction of the one core its event loop runs on),
                              sampled at most once a second
    named_metrics             in_flight_streams (model calls in flight now) and
                              tokens_per_second (output tokens of the plain streams
                              that ended, same average)

By Little's law the averaged in-flight count is arrival rate times call duration, so
the weight a client computes is ``--max-streams / mean call duration``: a replica
whose calls take twice as long gets half the calls, whatever it was sent so far.

Cost: everything is counted once per call (never per token): two updates of four
exponential averages and one message refilled and serialized when the call ends, 78
bytes. Measured with ``python -m timeit`` on the 2-core test machine under a load
average of 9: 2.4 us for the report, 1.6 us for the two counts, 3.7 to 4.8 us per call
in all, against about 1.2 ms end to end for the shortest one-token model call
(README, Performance).
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable

from .orca_load_report_pb2 import OrcaLoadReport

__all__ = ["HORIZON", "SERVER_FAULTS", "TRAILER", "LoadMeter", "load_trailer", "load_var"]

#: The metadata key gRPC clients read the report from.
TRAILER = "endpoint-load-metrics-bin"
#: Seconds: the time constant of the averages (--load-report-window). Long enough that
#: the rate of calls lasting several seconds is steady (the relative noise of the rate
#: is about 1 / sqrt(2 x HORIZON x calls per second)), short enough to follow a replica
#: that slows down within seconds.
HORIZON = 10.0
#: Seconds between two readings of the process's CPU time.
_CPU_PERIOD = 1.0
#: Outcomes that count as errors in ``eps``: the replica could not serve the call.
#: A caller's own mistakes (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...) and
#: cancellations do not.
SERVER_FAULTS = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED",
                           "RESOURCE_EXHAUSTED", "DATA_LOSS", "ERROR"})


class LoadMeter:
    """The load of one server process, as seen by its model calls."""

    __slots__ = ("_avg", "_capacity", "_clock", "_cpu", "_cpu_clock", "_cpu_stamp",
                 "_cpu_used", "_eps", "_message", "_named", "_rps", "_stamp", "_tau", "_tps",
                 "in_flight")

    def __init__(self, capacity: int, *, horizon: float = HORIZON,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.process_time) -> None:
        self._capacity = float(max(capacity, 1))
        self._tau = horizon
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._stamp = self._cpu_stamp = clock()
        self._cpu_used = cpu_clock()
        self._cpu = 0.0
        #: Model calls received and not ended yet (queued for admission included).
        self.in_flight = 0
        self._avg = 0.0  # time-weighted average of in_flight
        self._rps = 0.0  # per second: calls received, failed calls, output tokens
        self._eps = 0.0
        self._tps = 0.0
        # One message, refilled for each report (the meter lives on one event loop):
        # 0.6 us where building a new one with its map takes 2.5 us.
        self._message = OrcaLoadReport()
        self._named = self._message.named_metrics

    def _advance(self) -> None:
        """Brings the averages to now: each decays towards its current value."""
        now = self._clock()
        elapsed = now - self._stamp
        if elapsed > 0:
            keep = math.exp(-elapsed / self._tau)
            n = self.in_flight
            self._avg = n + (self._avg - n) * keep
            self._rps *= keep
            self._eps *= keep
            self._tps *= keep
            self._stamp = now
            if now - self._cpu_stamp >= _CPU_PERIOD:
                used = self._cpu_clock()
                self._cpu = (used - self._cpu_used) / (now - self._cpu_stamp)
                self._cpu_used, self._cpu_stamp = used, now

    def arrived(self) -> None:
        """A model call came in."""
        self._advance()
        self.in_flight += 1
        self._rps += 1.0 / self._tau

    def ended(self, outcome: str, output_tokens: int) -> None:
        """A model call ended with ``outcome`` (a status code name) after the engine
        wrote ``output_tokens``."""
        self._advance()
        self.in_flight -= 1
        if outcome in SERVER_FAULTS:
            self._eps += 1.0 / self._tau
        if output_tokens > 0:
            self._tps += output_tokens / self._tau

    def report(self) -> bytes:
        """The figures now, as a serialized OrcaLoadReport."""
        self._advance()
        message = self._message
        message.cpu_utilization = self._cpu
        message.rps_fractional = self._rps
        message.eps = self._eps
        message.application_utilization = self._avg / self._capacity
        named = self._named
        named["in_flight_streams"] = float(self.in_flight)
        named["tokens_per_second"] = self._tps
        return message.SerializeToString()

    def trailer(self) -> tuple[tuple[str, bytes]]:
        """The report as a trailing metadata entry."""
        return ((TRAILER, self.report()),)


#: The meter of the current model call, when load reports are on (else None): error
#: statuses made anywhere during the call carry its report too.
load_var: contextvars.ContextVar[LoadMeter | None] = contextvars.ContextVar(
    "tokenwire_load", default=None)


def load_trailer() -> tuple[tuple[str, bytes], ...]:
    """The current model call's load report entry, or nothing."""
    meter = load_var.get()
    return meter.trailer() if meter is not None else ()
