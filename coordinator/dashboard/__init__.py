"""A live job dashboard: one self-updating page and a JSON status, for the coordinator and the simulator.

    fedsite-coordinator serve --config JOB.toml ... --dashboard-port 8080     # then open http://127.0.0.1:8080/
    fedsite-simulate JOB.toml --dashboard-port 8080

Everything shown is read from state the job keeps anyway: ``metrics.jsonl``
(round records, ε, bytes, times, drops), the client registry (who is enrolled
and when each was last heard from) and two attributes of the round engine
(the round in progress and what the engine is doing). Nothing here writes to the job or
waits on the engine; the HTTP server runs in its own daemon threads.

One module per job:

- ``status``: the ``/api/status`` document, a pure function of the job's
  settings, its records and the live state (documented in docs/dashboard.md);
- ``view``: :class:`JobView`, the live state the coordinator or the simulator
  feeds (preparing text, engine, registry, outcome);
- ``svg``: charts drawn on the server as SVG strings;
- ``render``: the page, live (polled) or static (``report.html``);
- ``static``: the page of a finished run from its folder alone (the report's ``report.html``);
- ``assets``: the stylesheet and the polling script, shipped as Python strings;
- ``server``: the HTTP server (standard library), token, TLS and headers;
- ``options``: the command-line flags both CLIs share.

Why server-drawn SVG rather than a vendored charting library: the static
``report.html`` must open from disk (where a page cannot fetch its data) and
must look like the live page, so one Python renderer draws both; the page then
needs no third-party JavaScript to audit, update and license, works air-gapped
by construction, and its content is testable without a browser. The live page
carries only a small script that swaps in freshly rendered HTML every two
seconds.
"""

from __future__ import annotations

from coordinator.dashboard.status import JobInfo, build_status
from coordinator.dashboard.view import JobView

__all__ = ["JobInfo", "JobView", "build_status"]
