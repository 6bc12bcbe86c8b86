"""OpenMP's idle threads sleep instead of spinning, unless the user chose otherwise.

torch's CPU kernels run on OpenMP (libgomp), whose threads spin-wait for a while after each parallel region
(300,000 spins by default) before they sleep. One process per machine loses little to that; several on few
cores (three clients and the coordinator on two, as in the README's one-machine recipe) spin on the cores the
others need, and a training step there took 1.3-2.6 s where with idle threads asleep it took 0.2 s
(``simulations/bench/one_machine.py``). The CLIs call :func:`passive_openmp_by_default` before torch is imported:
libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one set: the user has chosen how threads wait


def passive_openmp_by_default(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set; True if it did.

    Call it before anything imports torch (it has no effect on an OpenMP runtime already loaded).
    """
    if any(name in environ for name in CHOICES):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
