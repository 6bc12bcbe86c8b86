"""SecAgg+ secure aggregation (Bell et al. 2020) as transport-free state machines.

The server (`SecAggPlusServer`) and each client (`SecAggPlusClient`) exchange
`Payload`s (dict[str, numpy.ndarray]); the round engine carries them over any
transport. See server.py for the driver loop.
"""

from privacy.secagg.client import SecAggClientState, SecAggPlusClient
from privacy.secagg.config import SecAggConfig
from privacy.secagg.errors import (
    QuantizationError,
    SecAggAborted,
    SecAggError,
    SecAggProtocolError,
)
from privacy.secagg.messages import SERVER_ID, Payload, Stage
from privacy.secagg.server import SecAggPlusServer

__all__ = [
    "SERVER_ID",
    "Payload",
    "QuantizationError",
    "SecAggAborted",
    "SecAggClientState",
    "SecAggConfig",
    "SecAggError",
    "SecAggPlusClient",
    "SecAggPlusServer",
    "SecAggProtocolError",
    "Stage",
]
