"""fedsite's per-user cache folder: what is derived once from inputs that do not change and can be
rebuilt at any time (converted GGUF models, frozen-prefix states of simulated clients). Deleting it is
always safe; ``$FEDSITE_CACHE_DIR`` moves it (a shared disk, a container volume)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FEDSITE_CACHE_DIR"


def fedsite_cache_dir() -> Path:
    """$FEDSITE_CACHE_DIR, else ~/.cache/fedsite."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "fedsite")
    return Path(root).expanduser()
