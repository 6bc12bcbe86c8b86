"""One clear line instead of a traceback for every error a user can cause.

Every command-line tool runs its work through :func:`run_cli`. Errors that
come from the user's input or environment (a bad job file, a missing data
file, a wrong token, an unreachable coordinator, a full disk) print
``<prog>: error: <message>`` and exit 2; anything else is a bug and keeps its
traceback.

Which errors are the user's is declared where each error is defined, with the
:func:`user_error` class decorator, so this bottom layer never imports the
packages above it: an error can only be raised once its module is imported,
and importing the module registers it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

E = TypeVar("E", bound=type[BaseException])


class UserError(RuntimeError):
    """Raised by fedsite code for a failure the user can fix; the message says how."""


_USER_ERRORS: list[type[BaseException]] = [UserError]
# the environment's own failures a user fixes (a missing file, a permission, a full disk)
_OS_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, OSError)


def user_error(cls: E) -> E:
    """Class decorator: ``cls`` is an error a user can fix; :func:`run_cli` prints it in one line."""
    if cls not in _USER_ERRORS:
        _USER_ERRORS.append(cls)
    return cls


def user_error_types() -> tuple[type[BaseException], ...]:
    """The error types :func:`run_cli` turns into one line: :class:`UserError`, the registered ones, OS errors."""
    return (*_USER_ERRORS, *_OS_ERRORS)


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
