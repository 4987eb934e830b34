"""Why the server cannot listen on an address, said in one line before it tries.

gRPC core reports a port it could not bind as "Failed to bind to address ...; set
GRPC_VERBOSITY=debug ...", without the cause. ``check_listen`` binds each address the
server is given (``--listen``, ``--health-listen``, ``--metrics-listen``) once itself, as
gRPC would (``SO_REUSEADDR``), closes it at once, and turns a failure into
``AddressUnusable`` with the cause: the address is in use (and by which process, when
``/proc`` shows it), needs privileges, or is not one of this machine's. It runs once at
start-up and on a failed bind, never during calls.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path

__all__ = ["AddressUnusable", "check_listen", "describe_bind_failure"]

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column
_NOT_TCP = ("unix:", "unix-abstract:", "vsock:")  # gRPC's other address schemes


class AddressUnusable(OSError):
    """An address the server was told to listen on cannot be bound (its message says
    which, through which flag, and why)."""


def check_listen(listen: str, flag: str) -> None:
    """Raises ``AddressUnusable`` when ``host:port`` cannot be bound now. Port 0 (any
    free port) and addresses that are not host:port (``unix:``, ``unix-abstract:``,
    ``vsock:``) are not checked."""
    if listen.startswith(_NOT_TCP):
        return
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) == 0:
        return
    port = int(port_text)
    if port > 65535:
        raise AddressUnusable(f"cannot listen on {listen} ({flag}): {port} is not a TCP port "
                              "(1 to 65535, or 0 for any free one)")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressUnusable(f"cannot listen on {listen} ({flag}): cannot resolve "
                              f"{host!r}: {exc.strerror}") from None
    failures: list[tuple[tuple[str, int], OSError]] = []
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                failures.append(((str(address[0]), port), exc))
    # gRPC listens when at least one of the addresses a name resolves to binds.
    if failures and len(failures) == len(infos):
        (ip, _), error = next(((a, e) for a, e in failures if e.errno == errno.EADDRINUSE),
                              failures[0])
        raise AddressUnusable(f"cannot listen on {listen} ({flag}): "
                              + _cause(error, ip, port))


def describe_bind_failure(listen: str, flag: str, tls: bool = False) -> AddressUnusable:
    """The error to raise when gRPC could not bind ``listen``: the cause, found again by
    ``check_listen`` (the address may have been taken after the check at start-up). With
    ``tls``, gRPC refuses a certificate or key it cannot use with the same error, so the
    message names them too."""
    try:
        check_listen(listen, flag)
    except AddressUnusable as exc:
        return exc
    if tls:
        return AddressUnusable(
            f"cannot listen on {listen} ({flag}): gRPC could not bind it; the address itself "
            "is free, so check --tls-cert and --tls-key (a certificate and key gRPC cannot "
            "use fail this way; run with GRPC_VERBOSITY=debug to see why)")
    return AddressUnusable(f"cannot listen on {listen} ({flag}): gRPC could not bind it "
                           "(run with GRPC_VERBOSITY=debug to see why)")


def _cause(exc: OSError, ip: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        holder = holder_of(ip, port)
        return "the address is in use" + (f" by {holder}" if holder else "") + (
            "; stop that process or choose another port")
    if exc.errno == errno.EACCES:
        return ("permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE); "
                "choose a port of 1024 or more")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{ip} is not an address of this machine; use one of its own, 127.0.0.1, or "
                "0.0.0.0 for every interface")
    return exc.strerror or str(exc)


def holder_of(ip: str, port: int) -> str | None:
    """``pid 1234 (its command line)`` of the process listening where ``ip:port`` would,
    read from /proc (Linux); a vaguer phrase when the socket is there but its process is
    not visible to this user; None when /proc tells nothing."""
    inodes = _listening_inodes(ip, port)
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    try:
        pids = [entry.name for entry in os.scandir(_PROC) if entry.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(_PROC / pid / "fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                target = os.readlink(_PROC / pid / "fd" / fd)
            except OSError:
                continue
            if target in wanted:
                return f"pid {pid} ({_command_name(pid)})"
    return "a process this user cannot see"


def _listening_inodes(ip: str, port: int) -> set[str]:
    ours = _normal(ipaddress.ip_address(ip.partition("%")[0]))
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            address_hex, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port:
                continue
            theirs = _normal(_proc_address(address_hex))
            if theirs == ours or theirs.is_unspecified or ours.is_unspecified:
                inodes.add(fields[9])
    return inodes


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp writes an address as 32-bit words in the host's byte order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _normal(address: ipaddress.IPv4Address | ipaddress.IPv6Address
            ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _command_name(pid: str) -> str:
    """The holder's executable name only: its command line may carry secrets (a Redis
    password in a URL, a key), and the message goes to logs. ``ps -p PID -o args`` shows
    the rest to whoever may see it."""
    try:
        return (_PROC / pid / "comm").read_text().strip() or "no name"
    except OSError:
        return "name not readable"
