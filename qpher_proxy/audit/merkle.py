"""RFC 6962 Merkle tree hashing, proofs and their verification (pure: no I/O, no trio).

Theory of operation
-------------------
**Hashes** (RFC 6962 §2.1, RFC 9162 §2.1.1): the tree of ``n`` leaves ``D[0:n]`` has the root
``MTH(D[0:n])``; ``MTH({}) = SHA-256()``, a leaf hashes as ``SHA-256(0x00 ‖ d)``, an inner node
as ``SHA-256(0x01 ‖ left ‖ right)``, and ``D[0:n]`` splits at ``k``, the largest power of two
smaller than ``n``. The prefixes keep a leaf from ever being confused with a node.

**Nodes.** Every *complete* subtree — ``2**level`` leaves starting at ``index * 2**level`` —
is a node ``(level, index)``. Once its leaves exist it never changes, which is what makes the
tree append-only: a stored node is written once. A tree of any size is the sequence of
complete subtrees along its right edge (at most one per level: the binary digits of ``n``),
the *compact range*; folding them right to left gives the root. ``CompactRange`` keeps exactly
these O(log n) hashes and extends them one leaf at a time: appending a leaf at an odd index
completes a node one level up, and so on, so each append costs one leaf hash and on average
one node hash, and reports the nodes it completed (``append`` returns them) so that a store
can keep them.

**Proofs** are generated exactly by the recursive definitions of RFC 9162 §2.1.3.1 (inclusion,
``PATH``) and §2.1.4.1 (consistency, ``SUBPROOF``), over a ``NodeSource`` — anything that can
return the stored hash of a complete node. The ranges those definitions ask for are always
aligned: a range ``[a, b)`` starts at a multiple of the smallest power of two ``>= b - a``, so
its hash is one stored node when ``b - a`` is a power of two, and otherwise a fold of at most
log2(b - a) stored nodes (``range_hash``). A proof costs O(log² n) node reads, no leaf data.

**Verification** uses the iterative algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2, which are
the ones independent verifiers (transparency-dev/merkle, Trillian, sigsum) implement; they
take only sizes, hashes and the proof, never the tree. Their edge cases follow
transparency-dev/merkle, whose vectors the tests run: an index beyond the size, a proof of
the wrong length, a consistency proof from the empty tree (meaningless: refused) and a
non-empty proof between equal sizes all fail. A failed verification raises ``ProofError`` with
no detail about which hash differed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import sha256
from typing import Protocol

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "MemoryTree",
    "NodeSource",
    "ProofError",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "range_hash",
    "root_from_consistency_proof",
    "root_from_inclusion_proof",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32  # SHA-256
EMPTY_ROOT = sha256(b"").digest()  # MTH({}), RFC 6962 §2.1


class ProofError(ValueError):
    """A proof does not verify (or cannot be made: sizes out of range)."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 ‖ data)``."""
    return sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 ‖ left ‖ right)``."""
    return sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


class NodeSource(Protocol):
    """Where the proofs read complete nodes from."""

    def node(self, level: int, index: int) -> bytes:
        """The hash of the complete subtree of ``2**level`` leaves starting at ``index << level``."""
        ...


def range_hash(src: NodeSource, begin: int, end: int) -> bytes:
    """``MTH(D[begin:end])`` for an aligned range (see the module docstring)."""
    size = end - begin
    if size <= 0:
        return EMPTY_ROOT
    if size & (size - 1) == 0:  # a power of two: one complete node
        level = size.bit_length() - 1
        return src.node(level, begin >> level)
    k = _split(size)
    return node_hash(range_hash(src, begin, begin + k), range_hash(src, begin + k, end))


def inclusion_proof(src: NodeSource, index: int, size: int) -> list[bytes]:
    """``PATH(index, D[0:size])`` (RFC 9162 §2.1.3.1)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not within a tree of size {size}")
    proof: list[bytes] = []
    begin, end, m = 0, size, index
    while end - begin > 1:
        k = _split(end - begin)
        if m < k:
            proof.append(range_hash(src, begin + k, end))
            end = begin + k
        else:
            proof.append(range_hash(src, begin, begin + k))
            begin, m = begin + k, m - k
    proof.reverse()  # the recursion lists the deepest sibling first
    return proof


def consistency_proof(src: NodeSource, first: int, second: int) -> list[bytes]:
    """``PROOF(first, D[0:second])`` (RFC 9162 §2.1.4.1); empty when ``first == second``."""
    if not 0 < first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")
    proof: list[bytes] = []
    begin, end, m, whole = 0, second, first, True
    while m != end - begin:
        k = _split(end - begin)
        if m <= k:
            proof.append(range_hash(src, begin + k, end))
            end = begin + k
        else:
            proof.append(range_hash(src, begin, begin + k))
            begin, m, whole = begin + k, m - k, False
    if not whole:
        proof.append(range_hash(src, begin, end))
    proof.reverse()
    return proof


def _check_hash(h: bytes, what: str) -> None:
    if len(h) != HASH_SIZE:
        raise ProofError(f"{what} must be {HASH_SIZE} bytes, not {len(h)}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` proves ``leaf`` (a leaf *hash*) to be included in (RFC 9162
    §2.1.3.2, steps 1-4); ``ProofError`` for a proof that cannot be right for any root."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not within a tree of size {size}")
    _check_hash(leaf, "the leaf hash")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        _check_hash(p, "a proof hash")
        if sn == 0:
            raise ProofError("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """``ProofError`` unless ``proof`` proves leaf hash ``leaf`` at ``index`` in the tree
    ``(size, root)``."""
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError("the inclusion proof does not verify")


def root_from_consistency_proof(first: int, second: int, proof: Sequence[bytes], first_root: bytes) -> bytes:
    """The root of size ``second`` that ``proof`` proves to extend ``(first, first_root)``
    (RFC 9162 §2.1.4.2); ``ProofError`` for a proof that cannot be right."""
    if second < first:
        raise ProofError(f"the second size {second} is smaller than the first {first}")
    if first == 0:
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if first == second:  # (as transparency-dev/merkle: the roots are then only compared)
        if proof:
            raise ProofError("the sizes are equal but the proof is not empty")
        return first_root
    _check_hash(first_root, "the first root")
    if not proof:
        raise ProofError("the consistency proof is empty")
    for p in proof:
        _check_hash(p, "a proof hash")
    path = list(proof)
    if first & (first - 1) == 0:  # step 2: a power of two: the first root is a node of the path
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is too short")
    if fr != first_root:
        raise ProofError("the consistency proof does not verify")
    return sr


def verify_consistency(
    first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes
) -> None:
    """``ProofError`` unless ``proof`` proves the tree ``(second, second_root)`` to extend
    ``(first, first_root)``."""
    if root_from_consistency_proof(first, second, proof, first_root) != second_root:
        raise ProofError("the consistency proof does not verify")


class CompactRange:
    """The right-edge frontier of a tree: the hashes of the complete subtrees that make up
    ``D[0:size]``, largest first (``hashes[i]`` has ``2**levels[i]`` leaves)."""

    __slots__ = ("_size", "_hashes")

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        self._size = size
        self._hashes = list(hashes)
        if len(self._hashes) != size.bit_count():
            raise ValueError(f"a compact range of size {size} has {size.bit_count()} hashes, "
                             f"not {len(self._hashes)}")

    @classmethod
    def from_source(cls, src: NodeSource, size: int) -> CompactRange:
        """The frontier of ``D[0:size]`` read from stored nodes (one read per set bit)."""
        hashes = []
        begin = 0
        for level in reversed(range(size.bit_length())):
            if size >> level & 1:
                hashes.append(src.node(level, begin >> level))
                begin += 1 << level
        return cls(size, hashes)

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf *hash*; returns the nodes it completed as ``(level, index, hash)``, the
        leaf itself first (level 0)."""
        index = self._size
        done = [(0, index, leaf)]
        h = leaf
        level = 0
        hashes = self._hashes
        while index & 1:
            h = node_hash(hashes.pop(), h)
            index >>= 1
            level += 1
            done.append((level, index, h))
        hashes.append(h)
        self._size += 1
        return done

    def root(self) -> bytes:
        """``MTH(D[0:size])``."""
        if not self._hashes:
            return EMPTY_ROOT
        r = self._hashes[-1]
        for h in reversed(self._hashes[:-1]):
            r = node_hash(h, r)
        return r


class MemoryTree:
    """A whole tree in memory (lists of nodes per level): the reference ``NodeSource`` for tests
    and for ``audit verify``, which rebuilds the tree from the log files."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        self._range = CompactRange()
        for leaf in leaves:
            self.append(leaf)

    @classmethod
    def from_data(cls, data: Iterable[bytes]) -> MemoryTree:
        return cls(leaf_hash(d) for d in data)

    @property
    def size(self) -> int:
        return self._range.size

    def append(self, leaf: bytes) -> None:
        for level, index, h in self._range.append(leaf):
            if level == len(self.levels):
                self.levels.append([])
            assert len(self.levels[level]) == index
            self.levels[level].append(h)

    def node(self, level: int, index: int) -> bytes:
        return self.levels[level][index]

    def root(self, size: int | None = None) -> bytes:
        """``MTH(D[0:size])`` (default: the whole tree)."""
        if size is None:
            return self._range.root()
        if not 0 <= size <= self.size:
            raise ProofError(f"size {size} is beyond the tree ({self.size})")
        return range_hash(self, 0, size) if size else EMPTY_ROOT
