"""Container health check: exit 0 when the coordinator's grpc.health.v1 says SERVING over (m)TLS.

Run by docker-compose inside the coordinator container; reads the same
environment as docker/entrypoint.sh (FEDSITE_PORT, FEDSITE_CERTS_DIR, FEDSITE_MTLS).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    certs = Path(os.environ.get("FEDSITE_CERTS_DIR", "/certs"))
    port = os.environ.get("FEDSITE_PORT", "50051")
    mutual = os.environ.get("FEDSITE_MTLS", "1") == "1"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "client-key.pem").read_bytes() if mutual else None,
        certificate_chain=(certs / "client.pem").read_bytes() if mutual else None,
    )
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("SERVING" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
