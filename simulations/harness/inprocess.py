"""An in-process driver of the round engine: clients are ClientRuntime objects in this process.

Every message still goes through the wire codec (encode, decode), so what a
client receives is byte for byte what gRPC or Flower would deliver. Used by
tests and benchmarks that need many rounds quickly; ``drop`` makes chosen
clients vanish at a chosen stage, to exercise dropout handling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from client.runtime import ClientRuntime
from coordinator.engine import Exchange
from protos.codec import Message, decode_message, encode_message

# (client id, message it is about to receive) -> True if the client vanishes instead
DropRule = Callable[[str, Message], bool]


@dataclass
class InProcessDriver:
    clients: dict[str, ClientRuntime]
    drop: DropRule | None = None
    replies_seen: list[tuple[str, Message]] = field(default_factory=list)
    record_replies: bool = False

    def wait_for_clients(self, count: int, timeout_s: float) -> list[str]:
        return sorted(self.clients)

    def exchange(self, round_id: int, messages: dict[str, Message], timeout_s: float) -> Exchange:
        result = Exchange(replies={})
        encoded: dict[int, bytes] = {}
        for client_id, message in sorted(messages.items()):
            if self.drop is not None and self.drop(client_id, message):
                result.failures[client_id] = "dropped (simulated)"
                continue
            if id(message) not in encoded:
                encoded[id(message)] = encode_message(message)
            blob = encoded[id(message)]
            result.bytes_down += len(blob)
            reply_blob = encode_message(self.clients[client_id].handle(decode_message(blob)))
            result.bytes_up += len(reply_blob)
            reply = decode_message(reply_blob)
            if self.record_replies:
                self.replies_seen.append((client_id, reply))
            result.replies[client_id] = reply
        return result
