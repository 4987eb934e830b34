"""Real X.509 certificates for the TLS and mTLS tests, made with `cryptography`.

One session makes: a test CA; a server certificate for ``localhost`` and
``127.0.0.1``; client certificates for a caller on the allow-list, for one that
is not, and for the allowed name but signed by a different ("rogue") CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ALLOWED_CLIENT", "OTHER_CLIENT", "KeyPair", "Pki", "make_pki"]

ALLOWED_CLIENT = "client-allowed.internal"
OTHER_CLIENT = "intruder.internal"


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    ca_path: Path
    server: KeyPair
    client_allowed: KeyPair
    client_other: KeyPair
    client_rogue: KeyPair  # the allowed name, signed by another CA


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(directory: Path, stem: str, cn: str, sans: list[x509.GeneralName],
          usage: x509.ObjectIdentifier, ca_key: ec.EllipticCurvePrivateKey,
          ca_cert: x509.Certificate) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return KeyPair(cert_pem, key_pem, cert_path, key_path)


def make_pki(directory: Path) -> Pki:
    ca_key, ca_cert = _ca("tokenwire test CA")
    rogue_key, rogue_cert = _ca("some other CA")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca_pem)
    server = _leaf(directory, "server", "localhost",
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                   ExtendedKeyUsageOID.SERVER_AUTH, ca_key, ca_cert)

    def client(stem: str, cn: str, key: ec.EllipticCurvePrivateKey,
               cert: x509.Certificate) -> KeyPair:
        return _leaf(directory, stem, cn, [x509.DNSName(cn)], ExtendedKeyUsageOID.CLIENT_AUTH,
                     key, cert)

    return Pki(
        ca_pem=ca_pem,
        ca_path=ca_path,
        server=server,
        client_allowed=client("client-allowed", ALLOWED_CLIENT, ca_key, ca_cert),
        client_other=client("client-other", OTHER_CLIENT, ca_key, ca_cert),
        client_rogue=client("client-rogue", ALLOWED_CLIENT, rogue_key, rogue_cert),
    )
