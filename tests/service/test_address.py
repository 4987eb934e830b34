"""The check that says why the server cannot listen on an address (_address.py)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import FAST
from tests.fakeollama import FakeOllama
from tokenwire.service import build_server
from tokenwire.service._address import AddressUnusable, check_listen, holder_of


@pytest.fixture
def taken() -> Iterator[int]:
    """A port this process listens on (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_names_its_holder(taken: int) -> None:
    with pytest.raises(AddressUnusable) as caught:
        check_listen(f"127.0.0.1:{taken}", "--listen")
    message = str(caught.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{taken} (--listen): the address "
                              f"is in use by pid {os.getpid()} (")
    assert "\n" not in message
    # a wildcard address overlaps the loopback listener, and so does its IPv4-mapped twin
    assert holder_of("0.0.0.0", taken) == holder_of("::ffff:127.0.0.1", taken)
    assert f"pid {os.getpid()}" in (holder_of("0.0.0.0", taken) or "")
    assert holder_of("127.0.0.2", taken) is None  # another address: not that listener


def test_free_any_and_unix_addresses_pass(taken: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    check_listen(f"127.0.0.1:{free}", "--listen")
    check_listen("127.0.0.1:0", "--listen")
    check_listen("unix:/tmp/tokenwire.sock", "--listen")


def test_an_address_of_another_machine() -> None:
    with pytest.raises(AddressUnusable, match=r"192\.0\.2\.1 is not an address of this machine"):
        check_listen("192.0.2.1:50051", "--listen")  # TEST-NET-1: never a local address
    with pytest.raises(AddressUnusable, match="cannot resolve 'no-such-host.invalid'"):
        check_listen("no-such-host.invalid:50051", "--listen")


async def test_a_port_taken_after_the_check_is_still_explained(
        taken: int, fake: FakeOllama) -> None:
    """gRPC's own bind failure (a RuntimeError without the cause) becomes the same error."""
    with pytest.raises(AddressUnusable, match=f"in use by pid {os.getpid()}"):
        await build_server(replace(FAST, ollama_url=fake.url, listen=f"127.0.0.1:{taken}"))


def test_other_schemes_and_impossible_ports() -> None:
    # gRPC's other schemes are not host:port, even when a path ends in ":<digits>"
    check_listen("unix:///run/tokenwire:80", "--listen")
    check_listen("unix-abstract:tokenwire:80", "--listen")
    with pytest.raises(AddressUnusable, match=r"70000 is not a TCP port \(1 to 65535"):
        check_listen("127.0.0.1:70000", "--listen")


async def test_a_certificate_grpc_refuses_is_named_not_the_free_address(
        tmp_path: Path, fake: FakeOllama) -> None:
    """gRPC refuses an unusable certificate with the same "Failed to bind" as a taken port;
    the address is free, so the message points at the TLS files."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(AddressUnusable, match="check --tls-cert and --tls-key"):
        await build_server(replace(FAST, ollama_url=fake.url, listen="127.0.0.1:0",
                                   tls_cert=str(cert), tls_key=str(key)))
