"""localio/allocator.py: freed buffers of a few MB are reused, seen as the page faults a process takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from localio.allocator import is_glibc, user_tuned_malloc

glibc_only = pytest.mark.skipif(not is_glibc(), reason="mallopt is glibc's")

# what a simulation actor does per client, in numpy alone: fresh buffers of 4 MB written, copied, serialized
CHURN = """
import ctypes, json, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the host's hugepage setting
import numpy as np
from localio.allocator import reuse_freed_memory_by_default
changed = reuse_freed_memory_by_default() if sys.argv[1] == "tune" else False
def client():
    update = np.empty(1 << 20, np.float32); update[:] = 0.5
    masked = (update * 3.0).astype(np.uint32)
    sent = masked.tobytes()
    garbage = [np.ones(300_000, np.float32) for _ in range(5)]
    return len(sent) + len(garbage)
for _ in range(3):
    client()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    client()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"changed": changed, "faults_per_client": faults}))
"""
PAGES_PER_CLIENT = 4 * (4 << 20) // 4096  # pages the four 4-MB buffers of one client touch


def _churn(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], env={**environ, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout)


@glibc_only
def test_freed_buffers_are_reused_without_page_faults() -> None:
    default, tuned = _churn("default"), _churn("tune")
    assert tuned["changed"] is True
    # glibc's default hands such buffers back to the kernel: a fault per page written, client after client
    assert default["faults_per_client"] > PAGES_PER_CLIENT / 4, default
    assert tuned["faults_per_client"] < PAGES_PER_CLIENT / 100, (tuned, default)


@glibc_only
def test_a_users_malloc_tuning_is_kept() -> None:
    kept = _churn("tune", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept["changed"] is False
    assert kept["faults_per_client"] > PAGES_PER_CLIENT / 4  # the user's (small) trim threshold rules


def test_what_counts_as_the_users_choice() -> None:
    assert not user_tuned_malloc({})
    assert not user_tuned_malloc({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"})
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        assert user_tuned_malloc({name: "0"})
    assert user_tuned_malloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})
