"""Cryptographic primitives of SecAgg+, all from `cryptography` and pycryptodome.

- Key agreement: X25519, the raw shared secret expanded with HKDF-SHA256 whose
  `info` binds the purpose, the round and the (ordered) pair of clients, so a
  key never serves two purposes, two rounds or two pairs.
- Share encryption: AES-256-GCM with a random 96-bit nonce; the associated data
  binds round, sender and recipient, so a ciphertext cannot be replayed in
  another round or redirected to another client.
- Secret sharing: pycryptodome's Shamir over GF(2^128) (16-byte secrets); a
  32-byte X25519 key is shared as two independent 16-byte halves. Clients split
  in pycryptodome's format with `split_secret` (Horner's rule over small share
  indices, ~9x pycryptodome's own split); the server recombines with `combine_secrets`, which gives
  the same bytes as pycryptodome's `Shamir.combine` (`combine_secret`, kept as
  the reference) but computes the Lagrange coefficients once per set of share
  indices and applies them to every secret over that set at once (numpy byte
  tables). Neither pycryptodome (one secret per call, coefficients recomputed
  each time, bit-serial field multiplication) nor `cryptography` (no field
  arithmetic) offers a batched combination.
- PRG: AES-CTR keystream over a zero buffer (AES-NI). Measured on this
  machine for 1M uint32 words (simulations/bench/secagg.py --prg): AES-CTR
  0.9 ms, numpy PCG64 `random_raw` 1.6 ms, `Generator.integers` 1.9 ms,
  Flower's RandomState int64 3.0 ms. AES-CTR is both the fastest and a
  cryptographic PRG; PCG64 is not (its state can be recovered from its
  output), which matters because a masked input leaks the top bits of its mask.
  Every mask seed is 16 bytes (AES-128, the 128-bit level of X25519): the
  self-mask seed always was, the pair-mask seeds since wire version 3.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache

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
    """Parse a raw X25519 public key (any 32 bytes parse: see :func:`is_usable_public_key`)."""
    return X25519PublicKey.from_public_bytes(raw)


_PROBE_KEY = X25519PrivateKey.generate()  # only ever used to test peers' public keys, never to agree a secret


def is_usable_public_key(raw: bytes) -> bool:
    """Whether every key agreement with ``raw`` yields a secret: 32 bytes that are not a low-order point.

    X25519 parses any 32 bytes, but agreeing with a point of small order gives the all-zero secret,
    which ``cryptography`` refuses with a ValueError. A client that offered such a key would make each
    of its neighbours fail at key sharing; checked where keys come in, it alone is left out instead.
    Clamped scalars are multiples of the cofactor, so one probe agreement tells for every private key.
    """
    if len(raw) != KEY_BYTES:
        return False
    try:
        _PROBE_KEY.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: str, round_id: int, a: int, b: int,
          length: int = KEY_BYTES) -> bytes:
    """`length`-byte key shared by clients a and b (order-free) for `purpose` in `round_id`."""
    low, high = (a, b) if a <= b else (b, a)
    secret = private.exchange(public_key_from_bytes(peer_public))
    info = _DOMAIN + purpose.encode() + _u64(round_id) + _u64(low) + _u64(high)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def pair_mask_seed(private: X25519PrivateKey, peer_public: bytes, round_id: int, a: int, b: int) -> bytes:
    """The PRG seed of the mask clients a and b add and subtract: 16 bytes, an AES-128 key like the self-mask seed.

    AES-128 matches the 128-bit security of X25519 and of the self mask, and its keystream is ~1.35x
    AES-256's (12.1 vs 8.9 GB/s here): a client at n = 100 draws 14 pair masks of 4 MB each round.
    Until wire version 3 the pair seeds were 32 bytes (AES-256): the two would not cancel.
    """
    return agree(private, peer_public, "mask", round_id, a, b, length=SEED_BYTES)


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
    """Shamir-share a 16- or 32-byte secret; share i (index i+1) is 16 or 32 bytes.

    pycryptodome's scheme and share format (GF(2^128), big-endian, the secret the polynomial's
    constant term, `threshold - 1` random coefficients from the OS, shares at x = 1..num_shares),
    evaluated here by Horner's rule: every step multiplies by a share index, which is small, so
    a step is a few shifts (`_gf_mul`'s short path) instead of pycryptodome's bit-serial product.
    ~9x faster (0.11 vs 0.96 ms for a 32-byte key in 15 shares, threshold 8); a client splits two
    secrets per round, so this was half its key-sharing stage. `combine_secret` (pycryptodome's
    own combine) recovers these shares; tests/privacy/test_secagg_combine.py checks it.
    """
    if len(secret) not in (SHARE_BYTES, 2 * SHARE_BYTES):
        raise ValueError(f"can only share 16- or 32-byte secrets, got {len(secret)} bytes")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"need 1 <= threshold <= num_shares, got threshold {threshold} of {num_shares} shares")
    shares = [b""] * num_shares
    for start in range(0, len(secret), SHARE_BYTES):
        constant = int.from_bytes(secret[start : start + SHARE_BYTES], "big")
        coefficients = [int.from_bytes(os.urandom(SHARE_BYTES), "big") for _ in range(threshold - 1)]
        for x in range(1, num_shares + 1):
            y = 0
            for c in coefficients:  # highest degree first: y = (...(c_top x + c_next) x + ...) x
                y = _gf_mul(y ^ c, x)
            shares[x - 1] += (y ^ constant).to_bytes(SHARE_BYTES, "big")
    return shares


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """Recover a secret from exactly `threshold` (index, share) pairs (index from 1)."""
    width = len(shares[0][1])
    out = b""
    for start in range(0, width, SHARE_BYTES):
        out += Shamir.combine([(idx, s[start : start + SHARE_BYTES]) for idx, s in shares], False)
    return out


# ---------------------------------------------------------------------- batched Shamir combination
#
# pycryptodome's field: GF(2^128) modulo x^128 + x^7 + x^2 + x + 1; a 16-byte share is the big-endian
# integer whose bit d is the coefficient of x^d. The secret is the interpolating polynomial at 0:
#     s = sum_j y_j * c_j,   c_j = prod_{m != j} x_m / prod_{m != j} (x_j + x_m)
# (Shamir.combine's formula), so the c_j depend only on the share indices x_m. Multiplying by a fixed
# c_j is linear over GF(2): byte b of y_j selects one of 256 precomputed products, and s is the XOR of
# 16 * k table entries (k shares). The tables for one index set (k * 64 KiB, built in ~1 ms) serve
# every secret shared over it; a set with only a few secrets is multiplied out directly.

_IRR = (1 << 128) | 0x87  # x^128 + x^7 + x^2 + x + 1
_MASK = (1 << 128) - 1
_SMALL_INDEX = 255  # share indices up to this use coefficients cached per max (neighbourhoods: ~2 log2 n + 1)
_TABLE_MIN_BLOCKS = 32  # fewer 16-byte blocks over one index set: multiply directly (tables cost ~30 blocks)


def _reduce(z: int) -> int:
    """z (any degree below 256) modulo x^128 + x^7 + x^2 + x + 1: fold the high half twice."""
    for _ in range(2):
        high = z >> 128
        if not high:
            break
        z = (z & _MASK) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
    return z


def _gf_mul(a: int, b: int) -> int:
    """Product in GF(2^128) of two field elements (ints below 2^128); 4-bit windows."""
    if a < b:
        a, b = b, a
    if b < 256:  # share indices: a few shifts
        z = 0
        while b:
            if b & 1:
                z ^= a
            a <<= 1
            b >>= 1
        return _reduce(z)
    window = [0, a, a << 1, (a << 1) ^ a]
    for i in range(4, 16):
        window.append(window[i >> 1] << 1 if i % 2 == 0 else window[i - 1] ^ a)
    z = 0
    for shift in range((b.bit_length() - 1) & ~3, -1, -4):
        z = (z << 4) ^ window[(b >> shift) & 15]
    return _reduce(z)


def _gf_inv(a: int) -> int:
    """Inverse in GF(2^128) (extended Euclid over GF(2)[x]; Hankerson et al., Alg. 2.48)."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^128)")
    u, v, g1, g2 = a, _IRR, 1, 0
    while u != 1:
        j = u.bit_length() - v.bit_length()
        if j < 0:
            u, v, g1, g2 = v, u, g2, g1
            j = -j
        u ^= v << j
        g1 ^= g2 << j
    return g1


@lru_cache(maxsize=64)
def _full_coefficients(top: int) -> tuple[int, ...]:
    """A_j = prod_{m != j} m / (j + m) over all of m in 1..top, for j = 0..top (entry 0 unused).

    These are the coefficients for the index set 1..top; `lagrange_at_zero` derives any
    subset's from them.
    """
    out = [0]
    for j in range(1, top + 1):
        num, den = 1, 1
        for m in range(1, top + 1):
            if m != j:
                num = _gf_mul(num, m)
                den = _gf_mul(den, j ^ m)
        out.append(_gf_mul(num, _gf_inv(den)))
    return tuple(out)


@lru_cache(maxsize=1024)
def lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    """The coefficients c_j with secret = sum_j c_j * share_j, for shares at these distinct indices.

    c_j = prod_{m in S, m != j} x_m / (x_j + x_m) for the index set S. Share indices are
    small (positions in a neighbourhood) and S is usually 1..max(S) less a few absent
    indices, so c_j is taken from the set 1..max(S) (cached per max) and corrected for
    the absent ones: c_j = A_j * prod_{a absent} (x_j + a) / prod_{a absent} a, one
    inversion per set and one full multiplication per coefficient.
    """
    for x in indices:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < 2**128:
            raise ValueError(f"share index must be an integer in [1, 2^128), got {x!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate share index in {list(indices)}")
    top = max(indices)
    if top > _SMALL_INDEX:  # not a neighbourhood position: the formula as it stands
        return tuple(
            _gf_mul(
                _product(x for m, x in enumerate(indices) if m != j),
                _gf_inv(_product(xj ^ x for m, x in enumerate(indices) if m != j)),
            )
            for j, xj in enumerate(indices)
        )
    full = _full_coefficients(top)
    absent = sorted(set(range(1, top + 1)) - set(indices))
    if not absent:
        return tuple(full[x] for x in indices)
    inverse = _gf_inv(_product(absent))
    return tuple(_gf_mul(_gf_mul(full[xj], _product(xj ^ a for a in absent)), inverse) for xj in indices)


def _product(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out = _gf_mul(out, v)
    return out


def _tables(coefficients: Sequence[int]) -> npt.NDArray[np.uint64]:
    """(k * 16 * 256, 2) uint64: row (j*16 + b)*256 + v is c_j times (byte b = v, big-endian), as (hi, lo)."""
    k = len(coefficients)
    basis = []  # c_j * x^d for d = 0..127
    for c in coefficients:
        for _ in range(128):
            basis.append(c.to_bytes(16, "big"))
            c <<= 1
            if c >> 128:
                c ^= _IRR
    words = np.frombuffer(b"".join(basis), dtype=">u8").astype(np.uint64).reshape(k, 16, 8, 2)
    by_byte = words[:, ::-1]  # degree d = 8q + bit; byte b of a big-endian share holds q = 15 - b
    table = np.empty((k, 16, 256, 2), dtype=np.uint64)
    table[:, :, 0] = 0
    for bit in range(8):  # entries [2^bit, 2^(bit+1)): those below XOR c_j x^(8q+bit)
        low = 1 << bit
        np.bitwise_xor(table[:, :, :low], by_byte[:, :, bit, None, :], out=table[:, :, low : 2 * low])
    return table.reshape(k * 16 * 256, 2)


def _combine_blocks(coefficients: Sequence[int], blocks: npt.NDArray[np.uint8]) -> bytes:
    """(rows, k, 16) share blocks over one index set -> rows 16-byte secrets, concatenated."""
    rows, k, _ = blocks.shape
    if rows < _TABLE_MIN_BLOCKS:
        out = b""
        for row in blocks:
            secret = 0
            for c, y in zip(coefficients, row, strict=True):
                secret ^= _gf_mul(c, int.from_bytes(y.tobytes(), "big"))
            out += secret.to_bytes(SHARE_BYTES, "big")
        return out
    table = _tables(coefficients)
    index = blocks.reshape(rows, k * SHARE_BYTES).astype(np.intp)
    index += np.arange(k * SHARE_BYTES, dtype=np.intp) * 256
    acc = table[index[:, 0]]
    for col in range(1, k * SHARE_BYTES):  # column by column: a reduce over the middle axis is ~7x slower
        acc ^= table[index[:, col]]
    return acc.astype(">u8").tobytes()


def combine_secrets(batch: Sequence[Sequence[tuple[int, bytes]]]) -> list[bytes]:
    """`combine_secret` for many secrets at once, each given as its (index, share) pairs.

    Secrets may differ in width (16 or 32 bytes) and in index sets; those over
    the same set of indices share one set of Lagrange coefficients and tables.
    Any number of shares >= the threshold gives the secret (the interpolating
    polynomial through more points of a polynomial is that polynomial); fewer
    give garbage, as with pycryptodome, so callers verify what they rebuild.
    """
    groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
    ordered: list[list[tuple[int, bytes]]] = []
    for pos, shares in enumerate(batch):
        if not shares:
            raise ValueError(f"secret {pos} has no shares")
        pairs = sorted(shares, key=lambda pair: pair[0])
        width = len(pairs[0][1])
        if width == 0 or width % SHARE_BYTES or any(len(s) != width for _, s in pairs):
            raise ValueError(f"secret {pos}: shares must all be the same non-zero multiple of {SHARE_BYTES} bytes")
        ordered.append(pairs)
        groups.setdefault((tuple(x for x, _ in pairs), width), []).append(pos)
    out: list[bytes] = [b""] * len(ordered)
    for (indices, width), members in groups.items():
        k, halves = len(indices), width // SHARE_BYTES
        raw = b"".join(s for pos in members for _, s in ordered[pos])
        grid = np.frombuffer(raw, dtype=np.uint8).reshape(len(members), k, halves, SHARE_BYTES)
        blocks = grid.transpose(0, 2, 1, 3).reshape(len(members) * halves, k, SHARE_BYTES)
        data = _combine_blocks(lagrange_at_zero(indices), blocks)
        for i, pos in enumerate(members):
            out[pos] = data[i * width : (i + 1) * width]
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


class PrgStream:
    """The keystream of :func:`prg_uint32` under one seed, handed out a block of words at a time.

    Successive blocks are the successive words of ``prg_uint32(seed, total)``: a caller that
    consumes a long mask block by block never holds more than one block of it.
    """

    def __init__(self, seed: bytes) -> None:
        self._encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        self._zeros = b""
        self._buffer = bytearray()

    def next_words(self, count: int) -> npt.NDArray[np.uint32]:
        """The next `count` words: a view of an internal buffer, valid until the next call."""
        nbytes = 4 * count
        if len(self._zeros) != nbytes:
            self._zeros = bytes(nbytes)
            self._buffer = bytearray(nbytes + 15)  # update_into wants a cipher block's slack
        written = self._encryptor.update_into(self._zeros, self._buffer)
        return np.frombuffer(self._buffer, dtype=np.uint32, count=written // 4)
