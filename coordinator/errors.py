"""One clear line instead of a traceback for every error a user can cause.

Both command-line tools run their work through :func:`run_cli`. Errors that
come from the user's input or environment (a bad job file, a missing data
file, a wrong token, an unreachable coordinator, a full disk) print
``<prog>: error: <message>`` and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(RuntimeError):
    """Raised by fedsite code for a failure the user can fix; the message says how."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from client.data import DataError
    from coordinator.checkpoint import CheckpointError
    from coordinator.config import ConfigError
    from coordinator.registry import AuthError
    from emulator.architectures import UnsupportedArchitectureError
    from emulator.lora import MergeError
    from emulator.models import ModelLoadError
    from emulator.package import PackageError

    return (UserError, ConfigError, DataError, ModelLoadError, PackageError, CheckpointError, AuthError,
            UnsupportedArchitectureError, MergeError, FileNotFoundError, PermissionError, OSError)


def run_cli(work: Callable[[], int], *, prog: str) -> int:
    try:
        return work()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed rounds are kept (restart with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_error_types() as exc:
        logging.getLogger("fedsite").debug("user error", exc_info=True)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
