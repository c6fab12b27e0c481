"""Merkle roots and inclusion proofs against a naive recursive definition (RFC 9162 2.1)."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.merkle import inclusion_proof, leaf_hash, node_hash, root, root_from_proof


def naive_root(items: list[bytes]) -> bytes:
    """MTH(D[n]) written exactly as RFC 9162 2.1.1 defines it."""
    if len(items) == 1:
        return hashlib.sha256(b"\x00" + items[0]).digest()
    k = 1
    while k * 2 < len(items):
        k *= 2
    return hashlib.sha256(b"\x01" + naive_root(items[:k]) + naive_root(items[k:])).digest()


items_strategy = st.lists(st.binary(min_size=0, max_size=8), min_size=1, max_size=70)


@given(items_strategy)
def test_root_matches_the_rfc_definition(items: list[bytes]) -> None:
    assert root(items) == naive_root(items)


@given(items_strategy, st.data())
def test_every_proof_leads_to_the_root(items: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(items) - 1))
    proof = inclusion_proof(items, index)
    assert root_from_proof(items[index], index, len(items), proof) == root(items)
    assert len(proof) <= max(1, len(items)).bit_length()


@given(items_strategy, st.data())
def test_a_wrong_item_index_or_proof_leads_elsewhere(
    items: list[bytes], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(items) - 1))
    proof = inclusion_proof(items, index)
    expected = root(items)
    assert root_from_proof(items[index] + b"x", index, len(items), proof) != expected
    if proof:
        bent = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
        assert root_from_proof(items[index], index, len(items), bent) != expected
        other = data.draw(st.integers(0, len(items) - 1))
        if items[other] != items[index] and other != index:
            with contextlib.suppress(ValueError):
                assert root_from_proof(items[index], other, len(items), proof) != expected


def test_known_small_trees() -> None:
    a, b, c = b"a", b"b", b"c"
    assert root([a]) == leaf_hash(a)
    assert root([a, b, c]) == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c))
    assert inclusion_proof([a, b, c], 2) == [node_hash(leaf_hash(a), leaf_hash(b))]
    assert inclusion_proof([a, b, c], 0) == [leaf_hash(b), leaf_hash(c)]


def test_proofs_of_the_wrong_length_are_refused() -> None:
    items = [bytes([i]) for i in range(5)]
    proof = inclusion_proof(items, 1)
    with pytest.raises(ValueError, match="longer"):
        root_from_proof(items[1], 1, 5, [*proof, proof[0]])
    with pytest.raises(ValueError, match="shorter"):
        root_from_proof(items[1], 1, 5, proof[:-1])
    with pytest.raises(ValueError, match="outside"):
        root_from_proof(items[1], 5, 5, proof)
    with pytest.raises(ValueError, match="at least one"):
        root([])
