"""Progress of long step loops (distillation, centralised training) for people and for log files.

On a terminal a tqdm bar is the right thing. A coordinator usually runs with its
stderr in a log file or a container log, where tqdm's carriage-return redraws turn
into one unreadable line: there we log a plain line every tenth of the run (and at
the end) instead. ``report`` receives the same short text on every step, for a
caller that shows it elsewhere (the coordinator tells waiting clients how far the
distillation is).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

from tqdm.auto import tqdm


class StepProgress:
    """Counts steps ``initial..total``; call :meth:`step` after each one and :meth:`close` at the end."""

    def __init__(self, desc: str, total: int, *, initial: int = 0, enabled: bool = True,
                 log: logging.Logger | None = None, report: Callable[[str], None] | None = None,
                 stream: TextIO | None = None) -> None:
        self.desc, self.total, self.done = desc, total, initial
        self.report = report
        self.log = log or logging.getLogger("fedsite.progress")
        stream = stream if stream is not None else sys.stderr
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, file=stream) \
            if enabled and stream.isatty() else None
        self.log_lines = enabled and self.bar is None
        self.every = max(1, total // 10)

    def text(self, **postfix: float) -> str:
        extra = "".join(f", {k} {v:.4g}" for k, v in postfix.items())
        return f"{self.desc}: step {self.done}/{self.total}{extra}"

    def step(self, **postfix: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        elif self.log_lines and (self.done % self.every == 0 or self.done == self.total):
            self.log.info("%s", self.text(**postfix))
        if self.report is not None:
            self.report(self.text(**postfix))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
