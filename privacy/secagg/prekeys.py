"""Keys made ahead: the public keys a client sends with its unmask reply for its next round.

A client's setup only hands the server two fresh X25519 public keys, so the
client makes its next round's pair at unmask and sends the public halves with
its shares (client.py, "Keys ahead"). The round engine keeps them per client
between rounds; the next :class:`~privacy.secagg.server.SecAggPlusServer` that
samples the client takes them instead of sending it a setup message. This
module checks what a client offered: :func:`offered_keys` when it arrives (its
form), :func:`usable_prekeys` when a round would rely on it. A pair that is
malformed, holds a low-order point (no secret can be agreed with it,
``is_usable_public_key``) or shares a key with another client's pair is
dropped (that client just gets a setup), never an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from privacy.secagg.crypto import KEY_BYTES, is_usable_public_key
from privacy.secagg.messages import Key, Payload

KeyPair = tuple[bytes, bytes]  # (mask public key, encryption public key)


def offered_keys(reply: Payload) -> KeyPair | None:
    """The next-round keys in an unmask reply whose other fields were checked, or None if they are unusable."""
    pair = []
    for key in (Key.NEXT_MASK_PK, Key.NEXT_ENC_PK):
        value = reply.get(key)
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.shape != (KEY_BYTES,):
            return None
        pair.append(value.tobytes())
    mask_pk, enc_pk = pair
    return None if mask_pk == enc_pk else (mask_pk, enc_pk)


def usable_prekeys(prekeys: Mapping[int, KeyPair], client_ids: list[int]) -> dict[int, KeyPair]:
    """The pairs of ``prekeys`` a round over ``client_ids`` can use: the round's clients' only, each pair of
    two distinct usable keys (not low-order points), and no key in two pairs (the setup's own rules)."""
    members = set(client_ids)
    candidates = {cid: pair for cid, pair in prekeys.items() if cid in members and len(pair) == 2
                  and all(isinstance(k, bytes) and is_usable_public_key(k) for k in pair) and pair[0] != pair[1]}
    counts: dict[bytes, int] = {}
    for pair in candidates.values():
        for key in pair:
            counts[key] = counts.get(key, 0) + 1
    return {cid: pair for cid, pair in sorted(candidates.items()) if all(counts[k] == 1 for k in pair)}
