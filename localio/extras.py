"""Which optional part of fedsite a command needs, and one line when it is not installed.

``pip install fedsite`` installs the client: ``fedsite-client run``, ``fedsite-emulator`` and what they
share with the server. The rest comes with pyproject's extras:

- ``coordinator``: ``fedsite-coordinator`` (gRPC health and reflection services, Flower's robust aggregators);
- ``simulation``: ``fedsite-simulate`` (Flower on Ray, the report's plots) and ``fedsite-client split``
  (flwr-datasets' partitioners);
- ``all``: both.

A command checks its extra before it parses its arguments (so ``--help`` says it too) and, when a module of
the extra is missing, prints ``<command> needs the <extra> extra (...): pip install 'fedsite[<extra>]'``
instead of a traceback from deep inside. ``tests/test_extras.py`` checks that these modules are what each
command imports beyond the base requirements, and that pyproject's extras provide them.
"""

from __future__ import annotations

import importlib.util

# extra -> the top-level modules its commands import that the base requirements do not provide
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "coordinator": ("grpc_health", "grpc_reflection", "flwr"),
    "simulation": ("flwr", "ray", "flwr_datasets", "datasets", "matplotlib"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed package counts as missing
        return False


def missing_extra(extra: str, command: str, modules: tuple[str, ...] | None = None) -> str | None:
    """The one-line message if ``command`` cannot run because a module of ``extra`` is missing, else None.

    ``modules`` narrows the check to what ``command`` imports (default: every module of the extra).
    """
    for module in EXTRA_MODULES[extra] if modules is None else modules:
        if not _installed(module):
            return f"{command} needs the {extra} extra ({module} is not installed): pip install 'fedsite[{extra}]'"
    return None
