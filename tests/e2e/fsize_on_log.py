"""``python -m tests.e2e.fsize_on_log TEXT BYTES coordinator serve ...``: a real coordinator whose disk "fills up"
the moment it logs TEXT: from then on no file may grow past BYTES (RLIMIT_FSIZE; writes fail with EFBIG, as on
a full disk). Small files (logs, metrics, checkpoints of a tiny model) still fit; a model export does not.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys


class LimitOnMessage(logging.Handler):
    def __init__(self, text: str, limit: int) -> None:
        super().__init__()
        self.text, self.limit = text, limit

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing us
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, hard))
            sys.stderr.write(f"fsize_on_log: files now limited to {self.limit} bytes\n")


def main(argv: list[str]) -> int:
    text, limit, program, *rest = argv
    if program != "coordinator":
        raise SystemExit(f"fsize_on_log: unknown program {program!r}")
    logging.getLogger("fedsite").addHandler(LimitOnMessage(text, int(limit)))
    from coordinator.cli import main as coordinator_main

    return coordinator_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
