"""``python -m tests.e2e.die_on_log TEXT client run ...``: a real fedsite process that dies the moment it logs TEXT.

Killing a process from the test after its log shows a line races with the
process's next call: a fast client can finish the following stage before the
kill lands (seen in CI: a SecAgg+ client killed "after masking" had already sent
its unmasking shares). Here the process itself ends with ``os._exit`` inside the
logging call, with no cleanup, no goodbye to the coordinator and no flush of
anything but the log line: to the coordinator it is the same as a SIGKILL at
exactly that point.
"""

from __future__ import annotations

import logging
import os
import sys

EXIT_CODE = 137  # what a shell reports for SIGKILL


class DieOnMessage(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            sys.stderr.write(f"die_on_log: exiting at {record.getMessage()!r}\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE)


def main(argv: list[str]) -> int:
    text, program, *rest = argv
    # on the "fedsite" logger, not the root: the coordinator's logging set-up replaces the root's handlers
    logging.getLogger("fedsite").addHandler(DieOnMessage(text))
    if program == "client":
        from client.cli import main as program_main
    elif program == "coordinator":
        from coordinator.cli import main as program_main
    else:
        raise SystemExit(f"die_on_log: unknown program {program!r}")
    return program_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
