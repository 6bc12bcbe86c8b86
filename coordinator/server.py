"""Starting the gRPC server: limits, admission, TLS, health and reflection.

Message size limits are set on both sides to one chunk plus headroom, so no
single message can exceed 4 MiB; large blobs are streamed. Every call goes
through :class:`coordinator.admission.Admission` (first-message deadlines,
per-address and per-client quotas, separate worker pools), so peers without
a session cannot exhaust the workers. The standard ``grpc.health.v1`` service
reports SERVING once the job is ready and NOT_SERVING when it ends, for
orchestrators and load balancers, and keeps answering under attack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.admission import Admission, AdmissionLimits
from coordinator.registry import AuthError
from protos import fedsite_pb2, fedsite_pb2_grpc
from protos.codec import MAX_CHUNK_BYTES

log = logging.getLogger("fedsite.server")

SERVICE_NAME = fedsite_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
MESSAGE_LIMIT = MAX_CHUNK_BYTES + 64 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC sets SO_REUSEPORT by default: a second coordinator on the same port would silently share
    # the clients with the first. Off, binding a port in use is an error.
    ("grpc.so_reuseport", 0),
    # streams one connection may hold open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)
    ("grpc.max_concurrent_streams", 100),
]
STOP_GRACE_S = 2.0
STOP_WAIT_S = 10.0  # after the grace every call is cancelled; past this, stopping gives up waiting


@dataclass
class TLSFiles:
    """The server's certificate and key, and the CA that signs client certificates (mutual TLS when set)."""
    cert: Path
    key: Path
    client_ca: Path | None = None


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """gRPC credentials from :class:`TLSFiles`; a missing file is named in a FileNotFoundError."""
    try:
        key, cert = tls.key.read_bytes(), tls.cert.read_bytes()
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as exc:
        raise FileNotFoundError(f"cannot read TLS file: {exc.filename}: {exc.strerror}") from exc
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class RunningServer:
    """A started gRPC server with what stopping it needs: its health service and admission layer."""
    server: grpc.Server
    port: int
    health: health.HealthServicer
    admission: Admission

    def set_serving(self, serving: bool) -> None:
        """What health checks answer: NOT_SERVING until the job is ready, and again while stopping."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """Stop serving: calls get ``grace_s`` to finish, then are cancelled. Never blocks for longer than
        ``grace_s + STOP_WAIT_S``; returns False (and logs) if gRPC had not finished shutting down by then."""
        self.set_serving(False)
        done = self.server.stop(grace_s).wait(timeout=grace_s + STOP_WAIT_S)
        self.admission.close()
        if not done:
            log.warning("the gRPC server had not finished stopping %.0fs after the grace period; going on",
                        STOP_WAIT_S)
        return done


def _authenticator(servicer: fedsite_pb2_grpc.CoordinatorServicer) -> Callable[[str, str], bool]:
    """Session check for the admission layer: the servicer's registry, if it has one."""

    def authenticate(client_id: str, session_key: str) -> bool:
        registry = getattr(servicer, "registry", None)
        if registry is None:
            return False
        try:
            registry.authenticate(client_id, session_key)
        except AuthError:
            return False
        return True

    return authenticate


def start_server(servicer: fedsite_pb2_grpc.CoordinatorServicer, address: str, *,
                 tls: TLSFiles | None = None, max_workers: int = 64,
                 limits: AdmissionLimits | None = None) -> RunningServer:
    """Serve ``servicer`` on ``address`` behind the admission layer, with health and reflection.

    Health answers NOT_SERVING until :meth:`RunningServer.set_serving`, so orchestration waits for the job.
    """
    admission = Admission(_authenticator(servicer), limits)
    # the global cap only bounds memory: admission refuses floods long before it is reached
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS,
                         interceptors=[admission], maximum_concurrent_rpcs=16 * max_workers)
    fedsite_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    # Blocking Watch: the default non-blocking one sends from HealthServicer.set() while holding the servicer's
    # lock and waits for gRPC's polling thread, which may at that moment be running a closing Watch's callback
    # that needs the same lock. That deadlock froze shutdown (set_serving(False), then stop() never returned).
    health_servicer = health.HealthServicer(experimental_non_blocking=False)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        if tls is None:
            log.warning("serving WITHOUT TLS on %s: traffic and tokens travel in plaintext", address)
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        admission.close()
        raise OSError(f"cannot bind {address} (in use, or not an address of this machine)") from exc
    if port == 0:
        admission.close()
        raise OSError(f"cannot bind {address}")
    server.start()
    running = RunningServer(server, port, health_servicer, admission)
    running.set_serving(False)
    return running
