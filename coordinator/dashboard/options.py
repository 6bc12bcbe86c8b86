"""The dashboard's command-line flags, shared by fedsite-coordinator serve and fedsite-simulate.

Kept here so both CLIs gain the same three flags and the same checks with a
couple of lines each: off unless ``--dashboard-port`` is given; 127.0.0.1
unless ``--dashboard-host`` says otherwise, which then needs a token.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from coordinator.dashboard.server import DEFAULT_HOST, DashboardServer, DashboardTLS, is_loopback
from coordinator.dashboard.view import JobView
from localio.atomic import atomic_write_text

TOKEN_ENV = "FEDSITE_DASHBOARD_TOKEN"
URL_FILE = "dashboard"  # in the output directory, beside "address": where the dashboard listens

log = logging.getLogger("fedsite.dashboard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--dashboard-*`` flags, shared by ``fedsite-coordinator serve`` and ``fedsite-simulate``."""
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help="serve a live dashboard (a page and /api/status) on this port; off by default, "
                             "0 = any free port")
    parser.add_argument("--dashboard-host", default=DEFAULT_HOST,
                        help=f"address for --dashboard-port (default {DEFAULT_HOST}); any other address needs "
                             "--dashboard-token")
    parser.add_argument("--dashboard-token", default=None,
                        help=f"token a viewer must give (required off loopback); default: ${TOKEN_ENV}, which "
                             "keeps it out of the process list")


def start_dashboard(args: argparse.Namespace, view: JobView, *, tls: DashboardTLS | None = None,
                    output_dir: Path | None = None) -> DashboardServer | None:
    """Start the dashboard the flags ask for (None when they ask for none); the URL goes to the log and to
    ``output_dir/dashboard``."""
    if args.dashboard_port is None:
        return None
    token = args.dashboard_token or os.environ.get(TOKEN_ENV) or None
    server = DashboardServer(view, host=args.dashboard_host, port=args.dashboard_port, token=token, tls=tls)
    url = server.start()
    if tls is None and not is_loopback(args.dashboard_host):
        log.warning("dashboard on %s WITHOUT TLS: its token and the job's status travel in plaintext "
                    "(set [tls] in the job file to serve it over HTTPS)", url)
    else:
        log.info("dashboard on %s%s", url, " (token required)" if token else "")
    if output_dir is not None:
        atomic_write_text(output_dir / URL_FILE, url + "\n")
    return server
