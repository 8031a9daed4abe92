"""RFC 6962 Merkle tree: transparency-dev/merkle vectors, and property tests of random trees."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpher_proxy.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MemoryTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_consistency_proof,
    verify_consistency,
    verify_inclusion,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "vectors" / "rfc6962_merkle_transparency_dev.json").read_text()
)
LEAVES = [bytes.fromhex(x) for x in VECTORS["leaf_inputs_hex"]]
ROOTS = [bytes.fromhex(x) for x in VECTORS["root_hashes_hex"]]


def _b(v: str | None) -> bytes:
    return base64.b64decode(v) if v else b""


def _bs(v: list[str] | None) -> list[bytes]:
    return [_b(x) for x in v or []]


@pytest.mark.parametrize("case", VECTORS["hasher"], ids=lambda c: c["desc"])
def test_hasher_vectors(case: dict[str, Any]) -> None:
    if case["kind"] == "empty":
        got = EMPTY_ROOT
    elif case["kind"] == "leaf":
        got = leaf_hash(bytes.fromhex(case["input_hex"]))
    else:
        got = node_hash(bytes.fromhex(case["left_hex"]), bytes.fromhex(case["right_hex"]))
    assert got.hex() == case["want"]


def test_roots_and_nodes_of_the_reference_tree() -> None:
    tree = MemoryTree()
    assert tree.root() == ROOTS[0]
    for n, leaf in enumerate(LEAVES, 1):
        tree.append(leaf_hash(leaf))
        assert tree.root() == ROOTS[n]
    for level, nodes in enumerate(VECTORS["node_hashes_hex"]):
        assert [h.hex() for h in tree.levels[level]] == nodes
    for n in range(9):
        assert tree.root(n) == ROOTS[n]


@pytest.mark.parametrize("probe", VECTORS["inclusion"], ids=lambda p: p["file"])
def test_inclusion_probes(probe: dict[str, Any]) -> None:
    args = (probe["leafIdx"], probe["treeSize"], _b(probe["leafHash"]), _bs(probe["proof"]),
            _b(probe["root"]))
    if probe["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("probe", VECTORS["consistency"], ids=lambda p: p["file"])
def test_consistency_probes(probe: dict[str, Any]) -> None:
    args = (probe["size1"], probe["size2"], _bs(probe["proof"]), _b(probe["root1"]), _b(probe["root2"]))
    if probe["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_generated_proofs_equal_the_happy_path_probes() -> None:
    tree = MemoryTree.from_data(LEAVES)
    happy = [p for p in VECTORS["inclusion"] if not p["wantErr"] and p["treeSize"] <= 8]
    assert happy
    for p in happy:
        assert inclusion_proof(tree, p["leafIdx"], p["treeSize"]) == _bs(p["proof"])
    happy_c = [p for p in VECTORS["consistency"] if not p["wantErr"] and 0 < p["size1"] and p["size2"] <= 8]
    assert happy_c
    for p in happy_c:
        assert consistency_proof(tree, p["size1"], p["size2"]) == _bs(p["proof"])


def test_out_of_range_proofs_are_refused() -> None:
    tree = MemoryTree.from_data(LEAVES)
    for index, size in ((0, 0), (8, 8), (-1, 3)):
        with pytest.raises(ProofError):
            inclusion_proof(tree, index, size)
    for first, second in ((0, 3), (4, 3), (-1, 2)):
        with pytest.raises(ProofError):
            consistency_proof(tree, first, second)


def test_compact_range_from_stored_nodes() -> None:
    tree = MemoryTree.from_data(bytes([i]) * i for i in range(37))
    for size in range(38):
        cr = CompactRange.from_source(tree, size)
        assert cr.root() == tree.root(size)
    cr = CompactRange.from_source(tree, 21)
    for i in range(21, 37):
        cr.append(tree.node(0, i))
    assert cr.root() == tree.root()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data())
def test_random_trees_prove_inclusion_and_consistency(n: int, data: st.DataObject) -> None:
    tree = MemoryTree.from_data(i.to_bytes(4, "big") for i in range(n))
    size = data.draw(st.integers(1, n))
    index = data.draw(st.integers(0, size - 1))
    root = tree.root(size)
    proof = inclusion_proof(tree, index, size)
    verify_inclusion(index, size, tree.node(0, index), proof, root)
    assert len(proof) <= (size - 1).bit_length()
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaf_hash(b"other"), proof, root)
    if index + 1 < size:
        with pytest.raises(ProofError):
            verify_inclusion(index + 1, size, tree.node(0, index), proof, root)
    first = data.draw(st.integers(1, size))
    cproof = consistency_proof(tree, first, size)
    verify_consistency(first, size, cproof, tree.root(first), root)
    assert root_from_consistency_proof(first, size, cproof, tree.root(first)) == root
    if first < size:
        forked = MemoryTree(tree.node(0, i) for i in range(first))
        forked.append(leaf_hash(b"fork"))
        with pytest.raises(ProofError):
            verify_consistency(first, size, cproof, tree.root(first), forked.root())
        if cproof:
            bad = list(cproof)
            j = data.draw(st.integers(0, len(bad) - 1))
            bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
            with pytest.raises(ProofError):
                verify_consistency(first, size, bad, tree.root(first), root)
