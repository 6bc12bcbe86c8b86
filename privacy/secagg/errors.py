"""Exceptions of the SecAgg+ protocol.

Three kinds, because the caller reacts differently to each: a protocol error
means one message was wrong (reject it, treat its sender as dropped), an abort
means the whole round cannot be unmasked (fail the round cleanly), and a
quantization error means the caller handed in an unusable vector (its bug).
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every SecAgg+ error."""


class SecAggProtocolError(SecAggError):
    """An incoming message is malformed, out of order, replayed or forged."""


class SecAggAborted(SecAggError):
    """The round cannot finish: too few clients left in some neighbourhood."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QuantizationError(SecAggError, ValueError):
    """An input vector cannot be quantized (non-finite values, wrong shape or dtype)."""
