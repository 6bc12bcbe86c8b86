"""Starting the gRPC server: limits, TLS, health and reflection.

Message size limits are set on both sides to one chunk plus headroom, so no
single message can exceed 4 MiB; large blobs are streamed. The standard
``grpc.health.v1`` service reports SERVING once the job is ready and
NOT_SERVING when it ends, for orchestrators and load balancers.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
]


@dataclass
class TLSFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    try:
        key, cert = tls.key.read_bytes(), tls.cert.read_bytes()
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as exc:
        raise FileNotFoundError(f"cannot read TLS file: {exc.filename}: {exc.strerror}") from exc
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace_s: float = 2.0) -> None:
        self.set_serving(False)
        self.server.stop(grace_s).wait()


def start_server(servicer: fedsite_pb2_grpc.CoordinatorServicer, address: str, *,
                 tls: TLSFiles | None = None, max_workers: int = 64) -> RunningServer:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS,
                         maximum_concurrent_rpcs=4 * max_workers)
    fedsite_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
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
        raise OSError(f"cannot bind {address} (in use, or not an address of this machine)") from exc
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    running = RunningServer(server, port, health_servicer)
    running.set_serving(False)
    return running
