"""The CLIs make OpenMP's idle threads sleep before torch loads, and leave a user's own choice alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from localio.openmp import passive_openmp_by_default
from simulations.harness.local_cluster import REPO, process_env


@pytest.mark.parametrize(("environ", "changed"), [
    ({}, True),
    ({"OMP_WAIT_POLICY": "active"}, False),
    ({"GOMP_SPINCOUNT": "300000"}, False),  # libgomp's own default, spelled out: the user's choice too
])
def test_passive_only_when_the_user_has_not_chosen(environ: dict[str, str], changed: bool) -> None:
    before = dict(environ)
    assert passive_openmp_by_default(environ) is changed
    assert environ == ({**before, "OMP_WAIT_POLICY": "PASSIVE"} if changed else before)


@pytest.mark.parametrize("cli", ["client.cli", "coordinator.cli"])
def test_the_cli_sets_it_before_torch_is_loaded(cli: str) -> None:
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: a CLI module that imported torch at its top
    would set it too late."""
    env = {k: v for k, v in process_env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    probe = (f"import os, sys; import {cli}; loaded = 'torch' in sys.modules; import torch; "
             "print(loaded, os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "PASSIVE"]
    chosen = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert chosen == ["False", "ACTIVE"]
