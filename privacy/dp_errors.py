"""The error of a DP-SGD setup that cannot run."""

from __future__ import annotations


class LocalDPError(ValueError):
    """Bad DP-SGD setup (no trainable parameters, unsupported data loader, bad σ/C)."""
