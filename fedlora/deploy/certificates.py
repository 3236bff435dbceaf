"""A federation's private CA, the SuperLink's TLS certificate and the SuperNodes' key pairs."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.core.errors import ConfigError, FedloraError

__all__ = ["Certificates", "make_certificates", "make_node_key"]


@dataclass(frozen=True)
class Certificates:
    """Paths of a private CA and of the SuperLink's certificate signed by it."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Certificates:
        """The file names `make_certificates` writes in ``directory``.

        Parameters
        ----------
        directory : Path
            The folder of the certificates (``~`` expanded, made absolute).

        Returns
        -------
        Certificates
            ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` in that folder.

        """
        d = directory.expanduser().resolve()
        return cls(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _refuse_existing(paths: Sequence[Path], field: str) -> None:
    for path in paths:
        if path.exists():
            raise FedloraError(f"{field}: {path} already exists; remove it or choose another path")


def make_certificates(
    directory: Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    *,
    days: int = 825,
    overwrite: bool = False,
) -> Certificates:
    """Write a self-signed CA and a SuperLink certificate signed by it, for ``hosts``.

    Writes ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (private keys mode
    0600, ECDSA P-384). Give ``ca.crt`` to every device.

    Parameters
    ----------
    directory : Path
        The folder for the four files (made if missing).
    hosts : Sequence[str]
        The names the SuperNodes use to reach the SuperLink: IP addresses become IP SANs,
        names DNS SANs; the first is the certificate's common name.
    days : int
        How long both certificates are valid.
    overwrite : bool
        Replace existing files instead of refusing.

    Returns
    -------
    Certificates
        The paths of the files written.

    Raises
    ------
    FedloraError
        If a file exists and ``overwrite`` is false (a new CA would orphan every device's
        copy of the old one), or ``hosts`` is empty.

    """
    if not hosts:
        raise ConfigError("host: at least one host name or IP address is needed")
    certs = Certificates.in_dir(directory)
    if not overwrite:
        _refuse_existing([certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key], "certs")
    certs.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(certs.ca_key, pem_key(ca_key))
    _write_private(certs.server_key, pem_key(server_key))
    certs.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return certs


def make_node_key(path: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a SuperNode's ECDSA P-384 key pair in OpenSSH format: ``path`` and ``path.pub``.

    The same files as ``ssh-keygen -t ecdsa -b 384 -N "" -f PATH``; the private key is
    mode 0600 and stays on the device, the ``.pub`` goes to the server operator.

    Parameters
    ----------
    path : Path
        The private key file; the public key is written next to it with ``.pub`` added.
    overwrite : bool
        Replace existing files instead of refusing.

    Returns
    -------
    tuple[Path, Path]
        The absolute paths of the private and the public key.

    Raises
    ------
    FedloraError
        If either file exists and ``overwrite`` is false.

    """
    path = path.expanduser().resolve()
    public = path.with_name(path.name + ".pub")
    if not overwrite:
        _refuse_existing([path, public], "node-key")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" fedlora-{path.name}\n".encode())
    return path, public
