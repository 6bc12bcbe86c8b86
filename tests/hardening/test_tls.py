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
from typing import Any

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


def _agent_error(port: int, tmp: Path, host: str = "127.0.0.1", ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None, give_up_s: float = 45.0) -> tuple[str, float]:
    """What a real client says when it cannot enrol, and how long it took to say it."""
    import time

    from client.agent import Agent, AgentOptions
    from localio.errors import UserError

    data = tmp / "data.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    agent = Agent(AgentOptions(coordinator=f"{host}:{port}", token="tok", data=data, state_dir=tmp / "state",
                               ca_cert=ca, cert=cert, key=key, give_up_after_s=give_up_s))
    started = time.monotonic()
    try:
        with pytest.raises(UserError) as info:
            agent.enrol()
    finally:
        agent.channel.close()
    return str(info.value), time.monotonic() - started


@pytest.mark.parametrize("case", ["plaintext-client", "other-ca", "host-not-covered", "tls-to-plaintext",
                                  "no-client-cert", "foreign-client-cert"])
def test_a_tls_mismatch_ends_the_client_in_one_line_with_the_ssl_reason(
        case: str, certs: dict[str, Path], other_certs: dict[str, Path], tmp_path: Path) -> None:
    """Before, every case retried for 15 minutes saying "Socket closed" or a raw handshake error."""
    tls = TLSFiles(cert=certs["server"], key=certs["server_key"])
    mtls = TLSFiles(cert=certs["server"], key=certs["server_key"], client_ca=certs["ca"])
    registry = ClientRegistry.from_tokens(["tok"])
    servicer = CoordinatorServicer(job_name="tls", registry=registry,
                                   mailbox=Mailbox(registry, heartbeat_timeout_s=30),
                                   package=PackageBlob(PACKAGE, sha256_hex(PACKAGE)))
    server_tls = {"tls-to-plaintext": None, "no-client-cert": mtls, "foreign-client-cert": mtls}.get(case, tls)
    server = start_server(servicer, "0.0.0.0:0" if case == "host-not-covered" else "127.0.0.1:0", tls=server_tls)
    try:
        options: dict[str, dict[str, Any]] = {
            "plaintext-client": {},
            "other-ca": {"ca": other_certs["ca"]},
            "host-not-covered": {"ca": certs["ca"], "host": "127.0.0.2"},
            "tls-to-plaintext": {"ca": certs["ca"]},
            "no-client-cert": {"ca": certs["ca"]},
            "foreign-client-cert": {"ca": certs["ca"], "cert": other_certs["client"], "key": other_certs["client_key"]},
        }
        message, seconds = _agent_error(server.port, tmp_path, **options[case])
    finally:
        server.stop(0)
    expected = {
        "plaintext-client": "the coordinator speaks TLS and this client does not: pass --ca-cert",
        "other-ca": "not signed by the CA given with --ca-cert (SSL_ERROR_SSL",
        "host-not-covered": "does not cover the host name",
        "tls-to-plaintext": "the coordinator does not speak TLS",
        "no-client-cert": "requires a client certificate (mutual TLS): pass --cert and --key",
        "foreign-client-cert": "refused this client's certificate",
    }[case]
    assert message.startswith("cannot connect to ") and expected in message, message
    assert "\n" not in message and seconds < 40  # not the give-up window: it stopped retrying


def test_an_unreachable_coordinator_is_not_mistaken_for_a_tls_mismatch(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    message, _ = _agent_error(port, tmp_path, give_up_s=4.0)
    assert "unreachable for 4s" in message and "TLS" not in message, message
