"""Load reports for gRPC clients that balance by load (ORCA, gRFC A51).

    _report                  LoadMeter (the figures of one process) and the trailer
    orca_load_report.proto   the report's message, wire-identical to
                             xds.data.orca.v3.OrcaLoadReport (generated: *_pb2.py)
"""

from ._report import HORIZON, SERVER_FAULTS, TRAILER, LoadMeter, load_trailer, load_var

__all__ = ["HORIZON", "SERVER_FAULTS", "TRAILER", "LoadMeter", "load_trailer", "load_var"]
