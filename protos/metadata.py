"""The gRPC call metadata both sides of the wire agree on (keys and values, no transport code).

A fedsite client sends its session on every call (``session_metadata``), so the
coordinator's admission control can admit the call before its first message; a
refused enrolment whose token's client is still alive carries ``RETRY_AFTER_KEY``
in its trailing metadata.
"""

from __future__ import annotations

CLIENT_ID_KEY = "fedsite-client-id"
SESSION_KEY = "fedsite-session"
# trailing metadata of an enrolment refused because the token's client is alive: seconds until a takeover is allowed
RETRY_AFTER_KEY = "fedsite-retry-after-s"


def session_metadata(client_id: str, session_key: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a fedsite client sends so the coordinator admits the call before its first message."""
    return ((CLIENT_ID_KEY, client_id), (SESSION_KEY, session_key))
