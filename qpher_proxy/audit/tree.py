"""The audit log's Merkle tree on disk: one append-only file of node hashes next to the log.

Theory of operation
-------------------
**What the leaves are.** Leaf *i* is the *i*-th newline-terminated line of the log (0-based,
across the rotated files in rotation order, then the current file), as stored, without its
newline — every line, not only records: a torn line that the writer terminated at recovery is
a line of the file (kept as evidence) and so a leaf, and the ``audit.recovered`` record after it
is the next leaf; checkpoint records are leaves too. Bytes after the last newline (a write in
progress, or torn and not yet repaired) are not a leaf yet.

**Layout.** ``.<log>.tree/nodes`` (beside the log, hidden from ``audit.log*``) holds the hash of
every complete node — the leaves and every complete subtree — 32 bytes each, in *post-order*:
appending leaf *i* completes the leaf and then ``t`` ancestors (``t`` = the trailing one bits
of *i*), and they are exactly the next ``1 + t`` nodes of the file. So a tree of ``n`` leaves
is ``2n - popcount(n)`` nodes, and node ``(level, index)`` (``2**level`` leaves from
``index << level``: ``merkle.NodeSource``) sits at position ``2m - popcount(m) - 1 -
tz(index + 1)`` with ``m = (index + 1) << level`` (``node_position``): the node count once its
last leaf is in, less the ancestors written after it. The file is only appended to
(``O_APPEND``): a node never changes once its leaves exist.

**Appending** (``append``, called by ``AuditLog`` under the log's ``flock``, right after the
line is written): the in-memory compact range (``merkle.CompactRange``) gives the nodes the new
leaf completes — one SHA-256 for the leaf, one more on average for the nodes — and they go to
the file in one ``os.write`` of 32 bytes, 64 on average. Nothing is fsynced: the tree is a cache
of the log, rebuildable from it.

**Opening and repair** (``reload``): the node count ``K`` is the file's size // 32; the leaf
count is the largest ``n`` with ``2n - popcount(n) <= K``, and the file is cut back to that
tree's ``2n - popcount(n)`` nodes (a torn last write loses its leaf, which ``AuditLog`` then
appends again from the log). ``AuditLog`` compares the tree's last leaf with the log's tail and
appends what is missing, or rebuilds the whole tree from the files (``rebuild``) when they do
not agree — a deleted or damaged tree, or a log written before the tree existed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from .merkle import HASH_SIZE, CompactRange, leaf_hash, range_hash

__all__ = [
    "NODES_FILE", "TreeStore", "iter_log_lines", "leaves_in", "node_count", "node_position", "tree_dir",
]

NODES_FILE = "nodes"

_READ_CHUNK = 1024 * 1024


def tree_dir(log_path: str | os.PathLike[str]) -> str:
    """``<dir>/.<name>.tree``: beside the log, and not matched by ``<name>*`` (``audit verify
    audit.log*`` names the log files only)."""
    directory, base = os.path.split(os.path.abspath(os.fspath(log_path)))
    return os.path.join(directory, f".{base}.tree")


def iter_log_lines(files: Iterable[str]) -> Iterator[bytes]:
    """Every newline-terminated line of ``files`` (in this order), without its newline; the
    bytes after a file's last newline are not a line (see "What the leaves are")."""
    for name in files:
        with open(name, "rb") as fh:
            rest = b""
            while chunk := fh.read(_READ_CHUNK):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                yield from lines


def node_count(n: int) -> int:
    """Nodes of a tree of ``n`` leaves: ``2n - popcount(n)``."""
    return 2 * n - n.bit_count()


def node_position(level: int, index: int) -> int:
    """The post-order position of node ``(level, index)`` (see "Layout")."""
    j = index + 1
    return node_count(j << level) - 1 - ((j & -j).bit_length() - 1)


def leaves_in(nodes: int) -> int:
    """The largest ``n`` with ``node_count(n) <= nodes``."""
    lo, hi = 0, nodes
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if node_count(mid) <= nodes:
            lo = mid
        else:
            hi = mid - 1
    return lo


class TreeStore:
    """The node file of one log's tree (see the module docstring); a ``NodeSource``."""

    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._range = CompactRange()
        # Run as root (an admin command beside a gateway running as its own user), files this
        # process creates go to the owner of the directory the log lives in, as the log's own do.
        parent = os.stat(os.path.dirname(os.path.abspath(directory)))
        owner = (parent.st_uid, parent.st_gid) if os.geteuid() == 0 and parent.st_uid != 0 else None
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if owner is not None:
                os.chown(directory, *owner)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd: int | None = os.open(os.path.join(directory, NODES_FILE), flags, 0o600)
        if owner is not None:
            os.fchown(self._fd, *owner)
        self.reload()

    @property
    def size(self) -> int:
        return self._range.size

    @property
    def directory(self) -> str:
        return self._dir

    def _file(self) -> int:
        if self._fd is None:
            raise OSError("the audit tree is closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def node(self, level: int, index: int) -> bytes:
        data = os.pread(self._file(), HASH_SIZE, node_position(level, index) * HASH_SIZE)
        if len(data) != HASH_SIZE:
            raise OSError(f"the audit tree has no node ({level}, {index})")
        return data

    def root(self, size: int | None = None) -> bytes:
        if size is None or size == self.size:
            return self._range.root()
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} is beyond the tree ({self.size})")
        return range_hash(self, 0, size)

    def last_leaf(self) -> bytes | None:
        return self.node(0, self.size - 1) if self.size else None

    def reload(self) -> None:
        """Read the size from the file, cut a torn end (see "Opening and repair"), rebuild the
        compact range."""
        fd = self._file()
        n = leaves_in(os.fstat(fd).st_size // HASH_SIZE)
        if os.fstat(fd).st_size != node_count(n) * HASH_SIZE:
            os.ftruncate(fd, node_count(n) * HASH_SIZE)
        self._range = CompactRange.from_source(self, n)

    def append(self, leaf: bytes) -> None:
        """Add one leaf *hash* and the nodes it completes, in one write."""
        done = self._range.append(leaf)
        os.write(self._file(), done[0][2] if len(done) == 1 else b"".join(h for _, _, h in done))

    def truncate(self) -> None:
        """Empty the tree (before a rebuild)."""
        os.ftruncate(self._file(), 0)
        self._range = CompactRange()

    def rebuild(self, files: Iterable[str]) -> None:
        """The tree of every line of ``files``, written afresh (buffered)."""
        self.truncate()
        fd = self._file()
        cr = self._range
        buf: list[bytes] = []

        def flush() -> None:
            view = b"".join(buf)
            while view:
                view = view[os.write(fd, view):]
            buf.clear()

        for i, line in enumerate(iter_log_lines(files), 1):
            buf.extend(h for _, _, h in cr.append(leaf_hash(line)))
            if i % 65536 == 0:
                flush()
        flush()
