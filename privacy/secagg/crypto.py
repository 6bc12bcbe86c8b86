"""Cryptographic primitives of SecAgg+, all from `cryptography` and pycryptodome.

- Key agreement: X25519, the raw shared secret expanded with HKDF-SHA256 whose
  `info` binds the purpose, the round and the (ordered) pair of clients, so a
  key never serves two purposes, two rounds or two pairs.
- Share encryption: AES-256-GCM with a random 96-bit nonce; the associated data
  binds round, sender and recipient, so a ciphertext cannot be replayed in
  another round or redirected to another client.
- Secret sharing: pycryptodome's Shamir over GF(2^128) (16-byte secrets); a
  32-byte X25519 key is shared as two independent 16-byte halves.
- PRG: AES-CTR keystream over a zero buffer (AES-NI). Measured on this
  machine for 1M uint32 words (simulations/bench_secagg.py --prg): AES-CTR
  0.9 ms, numpy PCG64 `random_raw` 1.6 ms, `Generator.integers` 1.9 ms,
  Flower's RandomState int64 3.0 ms. AES-CTR is both the fastest and a
  cryptographic PRG; PCG64 is not (its state can be recovered from its
  output), which matters because a masked input leaks the top bits of its mask.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import numpy.typing as npt
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from privacy.secagg.errors import SecAggProtocolError

KEY_BYTES = 32
SEED_BYTES = 16  # self-mask seed: exactly one Shamir secret
SHARE_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
_ID_BYTES = 8
#: plaintext of one encrypted share bundle: src, dst, seed share, two key-share halves
PLAINTEXT_BYTES = 2 * _ID_BYTES + SHARE_BYTES + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + PLAINTEXT_BYTES + TAG_BYTES
_DOMAIN = b"fedsite/secagg+/v1/"


def _u64(value: int) -> bytes:
    return int(value).to_bytes(_ID_BYTES, "little", signed=True)


def new_private_key(entropy: bytes | None = None) -> X25519PrivateKey:
    """A fresh X25519 key; `entropy` (32 bytes) only for reproducible simulations."""
    if entropy is None:
        return X25519PrivateKey.generate()
    return X25519PrivateKey.from_private_bytes(entropy)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte encoding of a private key."""
    return key.private_bytes_raw()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte encoding of the public half of `key`."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> X25519PublicKey:
    """Parse a raw X25519 public key."""
    return X25519PublicKey.from_public_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: str, round_id: int, a: int, b: int) -> bytes:
    """32-byte key shared by clients a and b (order-free) for `purpose` in `round_id`."""
    low, high = (a, b) if a <= b else (b, a)
    secret = private.exchange(public_key_from_bytes(peer_public))
    info = _DOMAIN + purpose.encode() + _u64(round_id) + _u64(low) + _u64(high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _aad(round_id: int, src: int, dst: int) -> bytes:
    return _DOMAIN + b"share" + _u64(round_id) + _u64(src) + _u64(dst)


def encrypt_shares(key: bytes, round_id: int, src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    """Encrypt src's shares for dst: nonce || AES-GCM(src, dst, seed share, key share)."""
    plaintext = _u64(src) + _u64(dst) + seed_share + key_share
    assert len(plaintext) == PLAINTEXT_BYTES
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(round_id, src, dst))


def decrypt_shares(key: bytes, round_id: int, src: int, dst: int, ciphertext: bytes) -> tuple[bytes, bytes]:
    """Inverse of encrypt_shares; SecAggProtocolError if tampered, replayed or misrouted."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise SecAggProtocolError(
            f"share ciphertext from client {src} has {len(ciphertext)} bytes, expected {CIPHERTEXT_BYTES}"
        )
    try:
        plaintext = AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], _aad(round_id, src, dst))
    except InvalidTag:
        raise SecAggProtocolError(
            f"share ciphertext from client {src} to client {dst} failed AES-GCM "
            f"authentication (tampered, replayed from another round or misrouted)"
        ) from None
    got_src = int.from_bytes(plaintext[:_ID_BYTES], "little", signed=True)
    got_dst = int.from_bytes(plaintext[_ID_BYTES : 2 * _ID_BYTES], "little", signed=True)
    if (got_src, got_dst) != (src, dst):
        raise SecAggProtocolError(f"share ciphertext claims {got_src}->{got_dst} but was delivered as {src}->{dst}")
    body = plaintext[2 * _ID_BYTES :]
    return body[:SHARE_BYTES], body[SHARE_BYTES:]


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """Shamir-share a 16- or 32-byte secret; share i (index i+1) is 16 or 32 bytes."""
    if len(secret) not in (SHARE_BYTES, 2 * SHARE_BYTES):
        raise ValueError(f"can only share 16- or 32-byte secrets, got {len(secret)} bytes")
    parts = [secret[i : i + SHARE_BYTES] for i in range(0, len(secret), SHARE_BYTES)]
    per_part = [Shamir.split(threshold, num_shares, part, False) for part in parts]
    return [b"".join(shares[i][1] for shares in per_part) for i in range(num_shares)]


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """Recover a secret from exactly `threshold` (index, share) pairs (index from 1)."""
    width = len(shares[0][1])
    out = b""
    for start in range(0, width, SHARE_BYTES):
        out += Shamir.combine([(idx, s[start : start + SHARE_BYTES]) for idx, s in shares], False)
    return out


def commit_seed(seed: bytes, round_id: int, client_id: int) -> bytes:
    """SHA-256 commitment to a self-mask seed, to verify its reconstruction."""
    return hashlib.sha256(_DOMAIN + b"seed" + _u64(round_id) + _u64(client_id) + seed).digest()


_ZEROS: bytes = b""


def prg_uint32(seed: bytes, size: int) -> npt.NDArray[np.uint32]:
    """`size` pseudo-random uint32 words: the AES-CTR keystream under a 16/32-byte seed."""
    global _ZEROS
    if len(_ZEROS) < 4 * size:
        _ZEROS = bytes(4 * size)
    zeros = _ZEROS if len(_ZEROS) == 4 * size else memoryview(_ZEROS)[: 4 * size]
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(zeros), dtype=np.uint32)
