"""Development certificates: a private CA, a server certificate and a client certificate.

    fedsite-coordinator certs --output-dir DIR [--host NAME ...] [--days N] [--force]

TLS should be on from the first run, and "get a certificate" should not be
the step that makes a user switch it off. This writes a throwaway CA and the
two leaf certificates a coordinator needs for TLS (``server.pem`` +
``server-key.pem``, with ``ca.pem`` as the clients' trust root) and for mutual
TLS (``client.pem`` + ``client-key.pem``, and ``ca.pem`` as the server's
``client_ca``). The server certificate names ``localhost`` and ``127.0.0.1``
plus every ``--host`` (DNS names or IP addresses), so it verifies on loopback,
inside docker-compose (service names) and on a LAN address. Private keys are
written with mode 0600. These are for development and closed deployments; a
public deployment should use certificates from its own PKI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from localio.errors import UserError, run_cli

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
FILES = ("ca", "server", "server_key", "client", "client_key")
FILE_NAMES = {
    "ca": "ca.pem", "server": "server.pem", "server_key": "server-key.pem",
    "client": "client.pem", "client_key": "client-key.pem",
}


class CertError(UserError):
    """A host name that cannot go into a certificate, or files that would be overwritten."""


def _general_name(host: str) -> x509.GeneralName:
    """An IP address SAN for literal addresses, a DNS SAN otherwise (gRPC checks IPs against IP SANs)."""
    host = host.strip()
    if not host or any(c.isspace() for c in host) or "/" in host or (":" in host and not _is_ip(host)):
        raise CertError(f"not a host name or IP address: {host!r}")
    if _is_ip(host):
        return x509.IPAddress(ipaddress.ip_address(host))
    try:
        host.encode("ascii")
    except UnicodeEncodeError as exc:
        raise CertError(f"host name {host!r} must be ASCII (use its punycode form)") from exc
    return x509.DNSName(host)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsite dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _leaf(common_name: str, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
          ca_key: ec.EllipticCurvePrivateKey, days: int, *, server_names: list[x509.GeneralName] | None
          ) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if server_names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(server_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Atomic write; a private key is created 0600 and never exists with wider permissions."""
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_dev_certs(output_dir: Path, hosts: list[str] | None = None, *, days: int = DEFAULT_DAYS,
                   overwrite: bool = True) -> dict[str, Path]:
    """Write a CA, a server and a client certificate into ``output_dir``; return their paths.

    Keys of the returned dict: ``ca``, ``server``, ``server_key``, ``client``,
    ``client_key``. The CA's private key is never written: it exists only
    while this runs, so nobody holding the folder can mint more certificates.
    The server certificate's subject alternative names are ``localhost``,
    ``127.0.0.1`` and ``hosts`` (deduplicated, order kept). With
    ``overwrite=False`` existing files are kept and returned as they are (so
    a container entrypoint can run this on every start).
    """
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    output_dir = Path(output_dir)
    paths = {name: output_dir / FILE_NAMES[name] for name in FILES}
    if not overwrite and all(p.exists() for p in paths.values()):
        return paths
    names: list[str] = []
    for host in [*DEFAULT_HOSTS, *(hosts or [])]:
        if host.strip() and host.strip() not in names:
            names.append(host.strip())
    sans = [_general_name(h) for h in names]
    output_dir.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedsite dev CA")).issuer_name(_name("fedsite dev CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key, client_key = _key(), _key()
    server_cert = _leaf(names[0] if names else "localhost", server_key, ca_cert, ca_key, days, server_names=sans)
    client_cert = _leaf("fedsite client", client_key, ca_cert, ca_key, days, server_names=None)
    pem = serialization.Encoding.PEM
    _write(paths["server_key"], _pem_key(server_key), private=True)
    _write(paths["client_key"], _pem_key(client_key), private=True)
    _write(paths["ca"], ca_cert.public_bytes(pem), private=False)
    _write(paths["server"], server_cert.public_bytes(pem), private=False)
    _write(paths["client"], client_cert.public_bytes(pem), private=False)
    return paths


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``certs`` options; pass a subparser to add them to ``fedsite-coordinator``."""
    parser = parser or argparse.ArgumentParser(prog="fedsite-coordinator certs",
                                               description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for the PEM files")
    parser.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="another DNS name or IP the server certificate must cover (repeatable)")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    parser.add_argument("--keep-existing", action="store_true",
                        help="do nothing if all files already exist (for container entrypoints)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the files for parsed ``certs`` arguments and list them on stdout."""
    paths = make_dev_certs(args.output_dir, args.host, days=args.days, overwrite=not args.keep_existing)
    for name in FILES:
        print(f"{name:10s} {paths[name]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``fedsite-coordinator certs ...`` (argv excludes the word ``certs``)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return run_cli(lambda: run(args), prog="fedsite-coordinator certs")


if __name__ == "__main__":
    sys.exit(main())
