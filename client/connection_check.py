"""Why a connection to the coordinator fails, when the reason is a TLS mismatch that retrying cannot heal.

gRPC reports some TLS mismatches with the SSL reason in its status details
(a certificate from another CA, a host name the certificate does not cover,
TLS to a plaintext coordinator) and others only as "Socket closed" (a
plaintext client at a TLS coordinator, a client certificate the coordinator
refuses). Before, the client retried either kind for 15 minutes. Here
:func:`tls_failure` reads the reason out of gRPC's details, and
:func:`probe` asks the coordinator directly with Python's ``ssl`` (the same
CA, certificate and key) when gRPC says nothing more than that the socket
closed. Both return one line for the user, or None when the failure is not
a TLS mismatch (the coordinator is down or restarting: keep retrying).
"""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

PROBE_TIMEOUT_S = 5.0
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": "the coordinator's certificate is not signed by the CA given with --ca-cert",
    "WRONG_VERSION_NUMBER": "the coordinator does not speak TLS (run without --ca-cert, or give the coordinator a "
                            "certificate in [tls])",
    "Hostname Verification": "the coordinator's certificate does not cover the host name in --coordinator (connect "
                             "by a name the certificate lists, or re-issue it with that name)",
}
_SSL_REASON = re.compile(r"(SSL_ERROR_\w+: error:\w+:SSL routines:OPENSSL_internal:[^:]+(?::[^:]+)?)")


def tls_failure(details: str) -> str | None:
    """The TLS reason in a gRPC status detail, with what to do about it; None if it names none."""
    for marker, hint in _HINTS.items():
        if marker in details:
            found = _SSL_REASON.search(details)
            reason = found.group(1) if found else marker
            return f"TLS handshake failed: {hint} ({reason.strip()})"
    if "handshake failed" in details.lower() or "SSL_ERROR" in details:
        return f"TLS handshake failed ({details.strip()[:300]})"
    return None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def probe(address: str, ca_cert: Path | None, cert: Path | None = None, key: Path | None = None) -> str | None:
    """Ask the coordinator at ``address`` why the connection closes; one line if it is a TLS mismatch.

    A plaintext client checks whether the coordinator speaks TLS. A TLS client repeats the handshake with its
    own CA, certificate and key and reads the coordinator's first answer, where a refused client certificate
    shows as an alert.
    """
    try:
        host, port = _split(address)
        raw = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except (OSError, ValueError):
        return None  # not reachable at all: the coordinator is down, keep retrying
    with raw:
        if ca_cert is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            try:
                with context.wrap_socket(raw, server_hostname=host):
                    return ("the coordinator speaks TLS and this client does not: pass --ca-cert (and --cert/--key "
                            "if the coordinator asks for client certificates)")
            except (ssl.SSLError, OSError):
                return None
        context = ssl.create_default_context(cafile=str(ca_cert))
        context.set_alpn_protocols(["h2"])  # what gRPC negotiates; without it the coordinator hangs up on anyone
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(PROBE_TIMEOUT_S)
                tls.sendall(_HTTP2_PREFACE)
                answer = tls.recv(16)  # an accepted client hears the coordinator's HTTP/2 settings
        except ssl.SSLCertVerificationError as exc:
            return f"TLS handshake failed: {exc.verify_message or exc}"
        except ssl.SSLError as exc:
            return f"TLS handshake failed ({exc.reason or exc})"
        except OSError:
            return None
        if answer:
            return None
        # TLS 1.3: the coordinator checks the client certificate after the handshake and hangs up if it refuses it
        if cert is None:
            return ("the coordinator requires a client certificate (mutual TLS): pass --cert and --key, signed by "
                    "the coordinator's client CA")
        return f"the coordinator refused this client's certificate {cert} (not signed by its client CA?)"
    return None
