"""The audit log's Merkle tree on disk: append-only level files next to the log.

Theory of operation
-------------------
**What the leaves are.** Leaf *i* is the *i*-th newline-terminated line of the log (0-based,
across the rotated files in rotation order, then the current file), as stored, without its
newline — every line, not only records: a torn line that the writer terminated at recovery is
a line of the file (kept as evidence) and so a leaf, and the ``audit.recovered`` record after it
is the next leaf; checkpoint records are leaves too. Bytes after the last newline (a write in
progress, or torn and not yet repaired) are not a leaf yet.

**Layout.** ``.<log>.tree/level-00`` (beside the log, hidden from ``audit.log*``) holds the leaf
hashes, ``level-01`` the hashes of complete pairs, and so on: node ``(level, index)`` is the 32
bytes at ``index * 32`` of ``level-LL`` (``merkle.NodeSource``). A tree of ``n`` leaves has
exactly ``n >> level`` nodes at each level. Files are only appended to (``O_APPEND``): a node
never changes once its leaves exist.

**Appending** (``append``, called by ``AuditLog`` under the log's ``flock``, right after the
line is written): the in-memory compact range (``merkle.CompactRange``) gives the nodes the new
leaf completes — one SHA-256 for the leaf, one more on average for the nodes — and each is
written to its level with one ``os.write`` (two on average). Nothing is fsynced: the tree is a
cache of the log, rebuildable from it.

**Opening and repair** (``open``/``reload``): the leaf count is ``size(level-00) // 32``. A
partial node at the end of a file (a crash mid-write) is cut off, nodes beyond ``n >> level``
are cut off, and missing upper nodes (a crash between levels) are recomputed from the level
below. ``AuditLog`` then compares the tree's last leaf with the log's tail and appends what is
missing, or rebuilds the whole tree from the files (``rebuild``) when they do not agree — a
deleted or damaged directory, or a log written before the tree existed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from .merkle import HASH_SIZE, CompactRange, leaf_hash, node_hash, range_hash

__all__ = ["TreeStore", "iter_log_lines", "tree_dir"]

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


class TreeStore:
    """The level files of one log's tree (see the module docstring); a ``NodeSource``."""

    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._fds: list[int] = []
        self._range = CompactRange()
        # Run as root (an admin command beside a gateway running as its own user), files this
        # process creates go to the owner of the directory the log lives in, as the log's own do.
        parent = os.stat(os.path.dirname(os.path.abspath(directory)))
        self._owner = (parent.st_uid, parent.st_gid) if os.geteuid() == 0 and parent.st_uid != 0 else None
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if self._owner is not None:
                os.chown(directory, *self._owner)
        self.reload()

    @property
    def size(self) -> int:
        return self._range.size

    @property
    def directory(self) -> str:
        return self._dir

    def _path(self, level: int) -> str:
        return os.path.join(self._dir, f"level-{level:02d}")

    def _fd(self, level: int) -> int:
        while len(self._fds) <= level:
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self._path(len(self._fds)), flags, 0o600)
            self._fds.append(fd)
            if self._owner is not None:
                os.fchown(fd, *self._owner)
        return self._fds[level]

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def node(self, level: int, index: int) -> bytes:
        data = os.pread(self._fd(level), HASH_SIZE, index * HASH_SIZE)
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
        """Read the size from the files, repair them (see "Opening and repair"), rebuild the
        compact range."""
        n = os.fstat(self._fd(0)).st_size // HASH_SIZE
        level = 0
        # every level file that exists is checked, also above the top (nodes of a larger tree
        # there would misplace the nodes appended later)
        while level == 0 or n >> level or level < len(self._fds) or os.path.exists(self._path(level)):
            want = n >> level
            fd = self._fd(level)
            have = os.fstat(fd).st_size
            if have > want * HASH_SIZE:
                os.ftruncate(fd, want * HASH_SIZE)
                have = want * HASH_SIZE
            have //= HASH_SIZE
            for index in range(have, want):  # a crash between levels: recompute from below
                os.write(fd, node_hash(self.node(level - 1, 2 * index), self.node(level - 1, 2 * index + 1)))
            level += 1
        self._range = CompactRange.from_source(self, n)

    def append(self, leaf: bytes) -> None:
        """Add one leaf *hash* and the nodes it completes."""
        for level, _index, h in self._range.append(leaf):
            os.write(self._fds[level] if level < len(self._fds) else self._fd(level), h)

    def append_line(self, line: bytes) -> None:
        self.append(leaf_hash(line))

    def truncate(self) -> None:
        """Empty every level (before a rebuild)."""
        for level in range(len(self._fds)):
            os.ftruncate(self._fds[level], 0)
        self._range = CompactRange()

    def rebuild(self, files: Iterable[str]) -> None:
        """The tree of every line of ``files``, written afresh (buffered per level)."""
        self.truncate()
        bufs: list[list[bytes]] = []
        cr = self._range

        def flush() -> None:
            for level, buf in enumerate(bufs):
                view = b"".join(buf)
                fd = self._fd(level)
                while view:
                    view = view[os.write(fd, view):]
                buf.clear()

        for i, line in enumerate(iter_log_lines(files), 1):
            for level, _index, h in cr.append(leaf_hash(line)):
                if level == len(bufs):
                    bufs.append([])
                bufs[level].append(h)
            if i % 65536 == 0:
                flush()
        flush()
