"""TLS and mutual TLS over loopback with the real servicer and dev certificates from ``coordinator.certs``.

Each check can fail: a plaintext client, a client that trusts another CA, a
server name the certificate does not cover, and (under mTLS) a client with no
certificate or one signed by another CA must all be refused by the handshake,
while a properly configured client enrols and sees health SERVING.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.certs import CertError, main, make_dev_certs
from coordinator.mailbox import Mailbox
from coordinator.registry import ClientRegistry
from coordinator.server import RunningServer, TLSFiles, start_server
from coordinator.servicer import CoordinatorServicer, PackageBlob
from protos import fedsite_pb2 as pb
from protos import fedsite_pb2_grpc as pb_grpc
from protos.codec import sha256_hex

PACKAGE = b"package bytes" * 100


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_certs(tmp_path_factory.mktemp("certs"), ["coordinator", "10.1.2.3"])


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second, unrelated CA and its leaves: must never be accepted by the first."""
    return make_dev_certs(tmp_path_factory.mktemp("other"), [])


def _serve(tls: TLSFiles) -> RunningServer:
    registry = ClientRegistry.from_tokens(["tok"])
    servicer = CoordinatorServicer(job_name="tls", registry=registry, mailbox=Mailbox(registry, heartbeat_timeout_s=30),
                                   package=PackageBlob(PACKAGE, sha256_hex(PACKAGE)))
    server = start_server(servicer, "127.0.0.1:0", tls=tls)
    server.set_serving(True)
    return server


@pytest.fixture
def tls_server(certs: dict[str, Path]) -> Iterator[RunningServer]:
    server = _serve(TLSFiles(cert=certs["server"], key=certs["server_key"]))
    yield server
    server.stop(0)


@pytest.fixture
def mtls_server(certs: dict[str, Path]) -> Iterator[RunningServer]:
    server = _serve(TLSFiles(cert=certs["server"], key=certs["server_key"], client_ca=certs["ca"]))
    yield server
    server.stop(0)


def _secure(port: int, ca: Path, cert: Path | None = None, key: Path | None = None,
            host: str = "127.0.0.1", name_override: str | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(),
                                         private_key=key.read_bytes() if key else None,
                                         certificate_chain=cert.read_bytes() if cert else None)
    options = [("grpc.ssl_target_name_override", name_override)] if name_override else []
    return grpc.secure_channel(f"{host}:{port}", creds, options=options)


def _enrol(channel: grpc.Channel) -> pb.EnrollReply:
    with channel:
        return pb_grpc.CoordinatorStub(channel).Enroll(pb.EnrollRequest(token="tok", client_name="t"), timeout=5)


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _enrol(channel)
    return info.value.code()


def test_files_modes_and_subject_alternative_names(certs: dict[str, Path], tmp_path: Path) -> None:
    assert {p.name for p in certs.values()} == {"ca.pem", "server.pem", "server-key.pem", "client.pem",
                                                "client-key.pem"}
    for name in ("server_key", "client_key"):
        assert stat.S_IMODE(certs[name].stat().st_mode) == 0o600
    assert not list(certs["ca"].parent.glob("*ca-key*"))  # the CA key never touches the disk
    server = x509.load_pem_x509_certificate(certs["server"].read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "coordinator"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    ca = x509.load_pem_x509_certificate(certs["ca"].read_bytes())
    for leaf in (server, x509.load_pem_x509_certificate(certs["client"].read_bytes())):
        leaf.verify_directly_issued_by(ca)  # raises if not signed by this CA
    with pytest.raises(CertError, match="not a host name"):
        make_dev_certs(tmp_path / "bad", ["bad host"])
    # the command: one line per file, and --keep-existing leaves files alone
    assert main(["--output-dir", str(tmp_path / "cli"), "--host", "node1"]) == 0
    before = (tmp_path / "cli" / "server.pem").read_bytes()
    assert main(["--output-dir", str(tmp_path / "cli"), "--keep-existing"]) == 0
    assert (tmp_path / "cli" / "server.pem").read_bytes() == before
    assert main(["--output-dir", str(tmp_path / "cli2"), "--host", "a b"]) == 2


def test_tls_client_works_and_plaintext_or_wrong_trust_fails(tls_server: RunningServer, certs: dict[str, Path],
                                                             other_certs: dict[str, Path]) -> None:
    port = tls_server.port
    assert _enrol(_secure(port, certs["ca"])).job_name == "tls"
    assert _enrol(_secure(port, certs["ca"], host="localhost")).job_name == "tls"
    assert _enrol(_secure(port, certs["ca"], name_override="coordinator")).job_name == "tls"
    with _secure(port, certs["ca"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert _refused(grpc.insecure_channel(f"127.0.0.1:{port}")) == grpc.StatusCode.UNAVAILABLE
    assert _refused(_secure(port, other_certs["ca"])) == grpc.StatusCode.UNAVAILABLE
    assert _refused(_secure(port, certs["ca"], name_override="evil.example")) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_cert_from_the_ca(mtls_server: RunningServer, certs: dict[str, Path],
                                                    other_certs: dict[str, Path]) -> None:
    port = mtls_server.port
    assert _enrol(_secure(port, certs["ca"], certs["client"], certs["client_key"])).job_name == "tls"
    assert _refused(_secure(port, certs["ca"])) == grpc.StatusCode.UNAVAILABLE
    assert _refused(_secure(port, certs["ca"], other_certs["client"], other_certs["client_key"])) == \
        grpc.StatusCode.UNAVAILABLE
    assert _refused(grpc.insecure_channel(f"127.0.0.1:{port}")) == grpc.StatusCode.UNAVAILABLE
    with _secure(port, certs["ca"], certs["client"], certs["client_key"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
