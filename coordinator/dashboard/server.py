"""The dashboard's HTTP server: standard library only, read-only, safe by default.

    GET  /              the page (polls /fragment every 2 s)
    GET  /fragment      the page's content, rendered now
    GET  /api/status    the status document as JSON (docs/dashboard.md)
    GET  /static/...    the page's CSS and script
    POST /login         exchanges the token for a session cookie (the only POST; it changes nothing in the job)

Safe by default: it binds to 127.0.0.1, where it checks the Host header (a web
page that rebinds its own name to 127.0.0.1 gets 403, not the job's status).
Any other address needs a token: a browser signs in once through a form and
gets an HttpOnly, SameSite=Strict cookie derived from the token (never the
token itself); scripts send ``Authorization: Bearer TOKEN``. Wrong tokens are
rate limited per address. With the coordinator's TLS certificate it serves
HTTPS. Every reply forbids framing, sniffing, caching and inline code
(Content-Security-Policy). The server's threads are daemons and never touch
the round engine; a page request costs a file stat and a render.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from coordinator.dashboard import assets
from coordinator.dashboard.render import render_fragment, render_page
from coordinator.dashboard.view import JobView
from coordinator.ratelimit import RateLimiter
from localio.errors import UserError

log = logging.getLogger("fedsite.dashboard")

DEFAULT_HOST = "127.0.0.1"
LOOPBACK_NAMES = ("localhost",)
MAX_FORM_BYTES = 4096
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
STATIC = {"/static/dashboard.css": ("text/css; charset=utf-8", assets.CSS),
          "/static/dashboard.js": ("text/javascript; charset=utf-8", assets.JS)}


class DashboardError(UserError):
    """A dashboard setting that would be unsafe or cannot work; the message says what to change."""


@dataclass(frozen=True)
class DashboardTLS:
    """The certificate and key the dashboard serves HTTPS with (the coordinator passes its own server pair)."""
    cert: Path
    key: Path


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine: the one case where no token is required."""
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _session_value(token: str) -> str:
    """What the cookie holds: derived from the token, so the browser never stores the token itself."""
    return hmac.new(token.encode("utf-8"), b"fedsite dashboard session", hashlib.sha256).hexdigest()


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedsite dashboard: sign in</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="static/dashboard.css"></head>
<body><main class="wrap"><section class="clients login"><h2>fedsite dashboard</h2>
<p>This dashboard needs the token its operator set with <code>--dashboard-token</code>.</p>{message}
<form method="post" action="login"><label>token <input type="password" name="token" autocomplete="current-password"
 autofocus required></label> <button type="submit">Open the dashboard</button></form></section></main></body></html>
"""


class DashboardServer:
    """Serves one :class:`JobView` until :meth:`close`."""

    def __init__(self, view: JobView, *, host: str = DEFAULT_HOST, port: int = 0, token: str | None = None,
                 tls: DashboardTLS | None = None) -> None:
        if not 0 <= port <= 65535:
            raise DashboardError(f"--dashboard-port must be 0..65535, got {port}")
        if token is not None and not token.strip():
            token = None
        if not is_loopback(host) and token is None:
            raise DashboardError(f"--dashboard-host {host} is reachable from other machines: give a token with "
                                 "--dashboard-token (or FEDSITE_DASHBOARD_TOKEN), or keep the default 127.0.0.1")
        self.view = view
        self.host, self.port, self.token, self.tls = host, port, token, tls
        self.failed_logins = RateLimiter(1.0, 20.0)  # per address: 20 wrong tokens, then one a second
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._fragment: tuple[dict[str, Any], str] | None = None
        self.cpu_seconds = 0.0  # CPU time spent answering requests (approximate under races): what it costs

    @property
    def url(self) -> str:
        """Where a viewer opens the page (IPv6 hosts in brackets), with the port actually bound."""
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{scheme}://{host}:{self.port}/"

    def start(self) -> str:
        """Listen and serve in a daemon thread; returns the URL (with the port bound when 0 was asked)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("_Server", (ThreadingHTTPServer,), {"address_family": family,
                                                                "handle_error": _quiet_error})
        try:
            server = server_class((self.host.strip("[]"), self.port), _handler(self))
        except OSError as exc:
            raise OSError(f"cannot serve the dashboard on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            except (OSError, ssl.SSLError) as exc:
                server.server_close()
                raise DashboardError(f"cannot use the TLS certificate {self.tls.cert} for the dashboard: {exc}") \
                    from exc
            # the handshake runs in the request's thread (see _Handler.setup), not in the accept loop,
            # so a client that connects and says nothing cannot stall other viewers
            server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()
        return self.url

    def close(self) -> None:
        """Stop serving and wait briefly for the HTTP thread; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- decisions, kept out of the handler so they read in one place --------------------------

    def allowed_hosts(self) -> set[str]:
        """``Host`` headers a request may carry: anything else is refused (DNS rebinding)."""
        names = {"127.0.0.1", "localhost", "[::1]", self.host if ":" not in self.host else f"[{self.host}]"}
        return {f"{name}:{self.port}" for name in names} | names

    def session_cookie_name(self) -> str:
        """One cookie name per port, so two dashboards on one host do not overwrite each other's."""
        return f"fedsite_dashboard_{self.port}"

    def fragment(self, status: dict[str, Any]) -> str:
        """The rendered page body, once per status document (the view rebuilds it at most once a second)."""
        cached = self._fragment
        if cached is not None and cached[0] is status:
            return cached[1]
        html = render_fragment(status)
        self._fragment = (status, html)
        return html


def _finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers (metrics.jsonl writes them as null too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _quiet_error(self: Any, request: Any, client_address: Any) -> None:
    """socketserver prints every handler exception to stderr; a dropped connection or a failed TLS
    handshake is not worth a traceback."""
    log.debug("dashboard request from %s failed", client_address, exc_info=True)


def _handler(owner: DashboardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        dashboard = owner

    return Handler


class _Handler(BaseHTTPRequestHandler):
    dashboard: DashboardServer
    timeout = 30  # seconds a connection may sit idle (slow or silent clients do not hold threads forever)
    server_version = "fedsite-dashboard"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def handle(self) -> None:
        start = time.thread_time()
        try:
            super().handle()
        finally:
            self.dashboard.cpu_seconds += time.thread_time() - start

    # -- replies -------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes | str, kind: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _login_page(self, status: int, message: str = "") -> None:
        html = LOGIN_PAGE.format(message=f'<p class="bad">{message}</p>' if message else "")
        self._send(status, html, "text/html; charset=utf-8")

    def _address(self) -> str:
        return str(self.client_address[0])

    # -- checks --------------------------------------------------------------------------------

    def _host_ok(self) -> bool:
        """Without a token, only loopback names may be in Host: defeats DNS rebinding."""
        if self.dashboard.token is not None:
            return True
        host = self.headers.get("Host")
        return host is None or host.lower() in self.dashboard.allowed_hosts()

    def _authorized(self) -> bool | None:
        """True, False (no credential), or None (a wrong token was presented)."""
        token = self.dashboard.token
        if token is None:
            return True
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            if hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
                return True
            self.dashboard.failed_logins.allow(self._address())
            return None
        cookies = self.headers.get("Cookie", "")
        name = self.dashboard.session_cookie_name()
        for part in cookies.split(";"):
            key, _, value = part.strip().partition("=")
            if key == name and hmac.compare_digest(value.encode(), _session_value(token).encode()):
                return True
        return False

    # -- methods -------------------------------------------------------------------------------

    def do_GET(self) -> None:  # http.server's name
        path = urllib.parse.urlsplit(self.path).path
        if not self._host_ok():
            self._send(403, "unexpected Host header: open the dashboard as http://127.0.0.1:PORT/\n")
            return
        if path in STATIC:
            kind, text = STATIC[path]
            self._send(200, text, kind)
            return
        if path not in ("/", "/fragment", "/api/status"):
            self._send(404, "not found\n")
            return
        if self.dashboard.failed_logins.exhausted(self._address()):
            self._send(429, "too many wrong tokens from this address; wait and retry\n", headers={"Retry-After": "5"})
            return
        authorized = self._authorized()
        if not authorized:
            if path == "/":  # the sign-in form, as a page (a browser logs a 401 document as a console error)
                wrong = authorized is None
                self._login_page(401 if wrong else 200, "token not accepted" if wrong else "")
            else:
                self._send(401, "a dashboard token is required (Authorization: Bearer TOKEN)\n",
                           headers={"WWW-Authenticate": 'Bearer realm="fedsite dashboard"'})
            return
        status = self.dashboard.view.status()
        if path == "/api/status":
            self._send(200, json.dumps(_finite(status), allow_nan=False, default=str), "application/json")
        elif path == "/fragment":
            self._send(200, self.dashboard.fragment(status), "text/html; charset=utf-8")
        else:
            self._send(200, render_page(status, live=True), "text/html; charset=utf-8")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/login" or self.dashboard.token is None:
            self._send(405, "the dashboard is read-only\n", headers={"Allow": "GET"})
            return
        if self.dashboard.failed_logins.exhausted(self._address()):
            self._send(429, "too many wrong tokens from this address; wait and retry\n", headers={"Retry-After": "5"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_FORM_BYTES:
            self._send(413, "form too large\n")
            return
        form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        token = self.dashboard.token
        given = (form.get("token") or [""])[0]
        if not hmac.compare_digest(given.encode(), token.encode()):
            self.dashboard.failed_logins.allow(self._address())
            self._login_page(401, "token not accepted")
            return
        secure = "; Secure" if self.dashboard.tls is not None else ""
        cookie = (f"{self.dashboard.session_cookie_name()}={_session_value(token)}; Path=/; HttpOnly; "
                  f"SameSite=Strict{secure}")
        self._send(303, "", headers={"Location": "./", "Set-Cookie": cookie})

    def _read_only(self) -> None:
        self._send(405, "the dashboard is read-only\n", headers={"Allow": "GET"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only

    def log_message(self, format: str, *args: Any) -> None:  # a page polls every 2 s: no line per request
        log.debug("dashboard %s: " + format, self.address_string(), *args)
