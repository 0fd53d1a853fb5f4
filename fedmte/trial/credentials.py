"""TLS certificates and SuperNode keys for a Flower federation, made with ``cryptography``.

A federation needs three kinds of key material:

* a certificate authority (CA) that the SuperNodes and the coordinator's ``flwr`` CLI trust
  (``--root-certificates``, ``root-certificates`` in the connection);
* a TLS server certificate for the SuperLink, signed by that CA, valid for the host names
  and IP addresses the sites dial (``127.0.0.1`` and ``localhost`` on loopback);
* one ECDSA P-384 key pair per SuperNode for Flower's node authentication: the private key
  in OpenSSH format (``flower-supernode --auth-supernode-private-key`` reads it with
  ``load_ssh_private_key``) and the public key as one OpenSSH line (``flwr supernode
  register`` reads it with ``load_ssh_public_key`` and accepts NIST curves only), the
  formats ``ssh-keygen -t ecdsa -b 384`` writes.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_VALIDITY = dt.timedelta(days=30)
"""Lifetime of generated certificates: long enough for a trial, short enough to be retired."""

TLS_CURVE = ec.SECP256R1()
"""P-256 for TLS: supported by every TLS stack Flower's HTTP clients and servers use."""

NODE_CURVE = ec.SECP384R1()
"""P-384 for node authentication, as Flower's documentation generates (ssh-keygen -b 384)."""


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmte local federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate and the SuperLink's certificate and key (PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Create a CA and a SuperLink server certificate for ``hosts`` under ``directory``.

    Each host that parses as an IP address goes into the certificate as an IP SAN, the rest
    as DNS SANs. The CA key is not kept: nothing else is ever signed with it.
    """
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(TLS_CURVE)
    ca_name = _name("fedmte local CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(TLS_CURVE)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return files


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode's authentication key pair: OpenSSH private key and ``.pub`` line."""

    private_key: Path
    public_key: Path


def make_node_key(directory: Path, name: str) -> NodeKeyFiles:
    """Write ``name`` (private, OpenSSH PEM) and ``name.pub`` (``ecdsa-sha2-nistp384 ...``)."""
    key = ec.generate_private_key(NODE_CURVE)
    files = NodeKeyFiles(directory / name, directory / f"{name}.pub")
    _write_private(
        files.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    files.public_key.write_bytes(public + f" {name}\n".encode())
    return files
