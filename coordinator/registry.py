"""Who may talk to the coordinator: enrolment tokens and the identities they buy.

Tokens are read from the job's tokens file and kept only as sha256 hashes.
Enrolling with a token yields a client id (stable per token, so a client that
lost its state comes back as itself) and a fresh session key. One token backs
one live client: while the client holding a token has been heard from within
``takeover_after_s`` (the job's heartbeat timeout), enrolling with that token
again is refused with :class:`TokenInUse` ("token in use by another client
since ..."); once it has been silent for longer, the next enrolment takes the
token over and the old session stops working. (Before, two clients sharing a
token revoked each other forever.) Session keys are stored hashed too, and
the registry is written atomically so a resumed coordinator still knows its
clients; after a restart nobody has been heard from, so a client may take
its token back at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from localio.atomic import atomic_write_json
from localio.errors import user_error


@user_error
class AuthError(PermissionError):
    """Wrong token, unknown client, or a session that is no longer valid."""


class TokenInUse(AuthError):
    """A valid token whose client is alive: the message says since when and when a takeover is allowed."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def read_tokens(path: Path) -> list[str]:
    """One token per line; blank lines and '#' comments ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read tokens file {path}: {exc.strerror}") from exc
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise ValueError(f"tokens file {path} holds no tokens")
    return tokens


@dataclass
class ClientRecord:
    """An enrolled client as saved in ``clients.json``: hashes only, so a leaked file reveals no token or session."""
    client_id: str
    token_hash: str
    session_hash: str
    name: str
    enrolled_at: float
    revoked: bool = False


@dataclass(frozen=True)
class ClientSeen:
    """What may be shown about an enrolled client: no token or session hashes."""

    client_id: str
    name: str
    enrolled_at: float  # time.time()
    seconds_since_seen: float | None  # None: not heard from since this coordinator started


class ClientRegistry:
    """Who may take part: enrolment tokens (hashed) to clients and their session keys.

    Saved after each enrolment, so a restarted coordinator still knows its clients' sessions.
    """
    def __init__(self, token_hashes: list[str], path: Path | None = None, *,
                 takeover_after_s: float | None = None) -> None:
        """``takeover_after_s``: silence after which another enrolment may take a client's token (None: at once,
        for tests and tools that play several roles; the coordinator passes the job's heartbeat timeout)."""
        self._token_hashes = set(token_hashes)
        self.takeover_after_s = takeover_after_s
        self._path = path
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._clients: dict[str, ClientRecord] = {}
        self.last_seen: dict[str, float] = {}
        if path is not None and path.exists():
            for raw in json.loads(path.read_text()).get("clients", []):
                record = ClientRecord(**raw)
                if record.token_hash in self._token_hashes:
                    self._clients[record.client_id] = record

    @classmethod
    def from_tokens(cls, tokens: list[str], path: Path | None = None, *,
                    takeover_after_s: float | None = None) -> ClientRegistry:
        """A registry for these plain tokens (hashed at once; only the hashes are kept)."""
        return cls([_hash(t) for t in tokens], path, takeover_after_s=takeover_after_s)

    def enroll(self, token: str, name: str = "") -> tuple[str, str]:
        """(client_id, session_key) for a valid token; AuthError otherwise (TokenInUse while its client lives)."""
        token_hash = _hash(token)
        if not any(hmac.compare_digest(token_hash, known) for known in self._token_hashes):
            raise AuthError("enrolment token not accepted")
        client_id = "client-" + token_hash[:12]
        session_key = secrets.token_hex(32)
        with self._lock:
            self._refuse_if_in_use(client_id)
            self._clients[client_id] = ClientRecord(
                client_id=client_id, token_hash=token_hash, session_hash=_hash(session_key),
                name=name[:128], enrolled_at=time.time(),
            )
            self.last_seen[client_id] = time.monotonic()
        self._save()
        return client_id, session_key

    def _refuse_if_in_use(self, client_id: str) -> None:
        """TokenInUse if ``client_id`` holds a session heard from within ``takeover_after_s`` (lock held)."""
        record, seen = self._clients.get(client_id), self.last_seen.get(client_id)
        if self.takeover_after_s is None or record is None or record.revoked or seen is None:
            return
        silent = time.monotonic() - seen
        if silent > self.takeover_after_s:
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.enrolled_at))
        wait = self.takeover_after_s - silent
        raise TokenInUse(
            f"enrolment token in use by another client since {since} (last heard from {silent:.0f}s ago); it can be "
            f"taken over once that client has been silent for {self.takeover_after_s:.0f}s", retry_after_s=wait)

    def authenticate(self, client_id: str, session_key: str) -> str:
        """The client id if its session key is current (and mark it seen); AuthError otherwise."""
        record = self._clients.get(client_id)
        if record is None or record.revoked:
            raise AuthError(f"unknown or revoked client {client_id[:40]!r}; enrol again")
        if not hmac.compare_digest(record.session_hash, _hash(session_key)):
            raise AuthError("session key not valid for this client (superseded by a newer enrolment?)")
        self.last_seen[client_id] = time.monotonic()
        return client_id

    def enrolled(self) -> int:
        """How many clients hold a session (the dashboard's and metrics' count)."""
        return sum(1 for record in self._clients.values() if not record.revoked)

    def active(self, within_s: float) -> list[str]:
        """Clients heard from in the last ``within_s`` seconds."""
        now = time.monotonic()
        return sorted(cid for cid, record in self._clients.items()
                      if not record.revoked and now - self.last_seen.get(cid, -1e18) <= within_s)

    def clients_seen(self) -> list[ClientSeen]:
        """Every live enrolment, for display; a copy taken under the lock, so any thread may call it."""
        now = time.monotonic()
        with self._lock:
            records = [r for r in self._clients.values() if not r.revoked]
            seen = dict(self.last_seen)
        return [ClientSeen(r.client_id, r.name, r.enrolled_at,
                           now - seen[r.client_id] if r.client_id in seen else None)
                for r in sorted(records, key=lambda r: r.client_id)]

    def _save(self) -> None:
        """Persist a snapshot; enrolments do not queue behind the fsync, only writers do."""
        if self._path is None:
            return
        with self._lock:
            snapshot = {"clients": [asdict(r) for r in self._clients.values()]}
        with self._write_lock:
            atomic_write_json(self._path, snapshot)
