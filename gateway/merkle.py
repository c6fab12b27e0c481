"""Merkle trees over message log records, as in RFC 9162 (Certificate Transparency 2.0) 2.1.

A batch of records is timestamped once: its leaves are the records' chain hashes, the tree's
root goes to the time-stamping authority, and each record is shown to be in the batch by an
inclusion proof of about log2(n) hashes, without revealing any other record.

    leaf hash  = SHA-256(0x00 || record hash)
    node hash  = SHA-256(0x01 || left || right)

A tree of n leaves splits at the largest power of two below n (RFC 9162 2.1.1), so the root,
and every proof, is defined for any n >= 1. Pure functions; the proofs are verified by
`root_from_proof` (RFC 9162 2.1.3.2), which the evidence bundle documents step by step for
checking with `openssl dgst`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _root(leaves: Sequence[bytes]) -> bytes:
    """Root over already-hashed leaves, bottom-up: pair neighbours, carry an odd last node up."""
    level = list(leaves)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def root(items: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of `items` (at least one)."""
    if not items:
        raise ValueError("a Merkle tree needs at least one leaf")
    return _root([leaf_hash(item) for item in items])


def inclusion_proof(items: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf `index` (RFC 9162 2.1.3.1), nearest sibling first."""
    if not 0 <= index < len(items):
        raise ValueError(f"leaf {index} is outside a tree of {len(items)}")
    leaves = [leaf_hash(item) for item in items]
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    # walk down from the root, collecting the sibling subtree of each split, then reverse
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(_root(leaves[lo + k : hi]))
            hi = lo + k
        else:
            path.append(_root(leaves[lo : lo + k]))
            lo = lo + k
    path.reverse()
    return path


def root_from_proof(item: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root that `proof` leads to from `item` at `index` in a tree of `size` leaves.

    RFC 9162 2.1.3.2. Raises `ValueError` when the proof has the wrong length for that
    position; a proof that is merely wrong leads to a different root, which the caller
    compares with the stamped one.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is outside a tree of {size}")
    fn, sn = index, size - 1
    r = leaf_hash(item)
    for p in proof:
        if sn == 0:
            raise ValueError("the inclusion proof is longer than the tree is deep")
        if fn % 2 == 1 or fn == sn:
            r = node_hash(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("the inclusion proof is shorter than the tree is deep")
    return r
