"""The audit log writer: an append-only, hash-chained JSON-lines file with size rotation.

Theory of operation
-------------------
**Records** are encoded by ``records.encode_record``: one JSON line each, carrying ``seq`` (1,
2, 3, … across all files) and ``prev`` = SHA-256 of the previous line's bytes (``GENESIS``, 64
zeros, for the very first). That chain is what ``verify`` checks.

**Writing** (``record``) is synchronous and cheap: check the fields (a secret-looking field is
refused before anything happens), take the lock, make sure our view of the file's tail is
current, encode, ``os.write`` the line (one unbuffered syscall: the line is in the kernel when
``record`` returns, so a crash of this process loses nothing that was recorded), ``fsync``
for CRITICAL records (``fsync_policy="critical"``, the default; ``"always"`` fsyncs every
record, ``"never"`` none — then a power loss may lose the last records), release the lock.
Any OS error becomes ``AuditUnavailable`` (503): a request that must be audited is then
refused by its caller, never served silently. After an error the file is re-opened and its
tail re-read on the next call, so the log heals by itself once the disk does.

**Health** (``health()``, for ``/readyz``): the outcome of the last append, so that a load
balancer stops sending requests that would be refused anyway. It costs nothing while appends
succeed. After a failure it probes, at most once per ``probe_interval``: take the lock and
re-open the file and re-read its tail as the next append would, appending no record of its own
(only the repair of a torn tail that any next append would write). So readiness comes back
without traffic once the log can be opened again; a disk that opens but refuses writes
(full) shows again at the next append.

**Several writers.** The running proxy and the CLI (``apikey create``/``revoke``) may both
append. Every append holds an exclusive ``flock`` on ``<path>.lock`` and starts by comparing
the file's identity and size with what this writer last saw (one ``stat``): if another
process appended or rotated, the tail is re-read, so the chain stays linear.

**Rotation.** When a record would make the file larger than ``rotate_bytes``, the file is
renamed ``<path>.NNNNNN`` (the next free number, six digits or more) and a new ``<path>`` is
created; the record goes into the new file with ``prev`` = hash of the last line of the old
one, so the chain runs across files. ``verify`` takes the files in rotation order.

**Start and crash recovery.** On opening, the chain resumes from the last line of ``<path>``
(or of the newest rotated file if ``<path>`` is missing or empty; ``GENESIS`` if there is
none). A crash in the middle of ``os.write`` can leave a *torn* last line: bytes without the
final newline. That line is kept (the log is append-only; it is evidence), terminated with a
newline, and followed by a ``audit.recovered`` record (severity WARNING) whose
``torn_sha256``/``torn_bytes`` identify it and whose ``prev`` is the hash of the last complete
record before it. ``verify`` accepts a non-record line exactly when the next record is such a
recovery record naming its hash; any other non-record line is reported. (If the torn bytes
happen to be a complete, correctly linked record that only lacks its newline, the newline is
added and the chain simply continues from it.) If the last complete line is not a record
(disk corruption or tampering), the chain continues from its hash and a recovery record with
``reason="unparseable_tail"`` notes it; ``verify`` still reports the bad line.

**The Merkle tree** (``tree.py``, on unless ``tree=False``): every line this writer makes
complete — each record, and a torn line when the recovery terminates it — is appended as a leaf
to ``.<name>.tree/`` beside it (``tree.tree_dir``) right after the line is written, under the same
lock. Whenever the file is
re-opened (start, another writer appended or rotated, after an error) the tree is reloaded and
compared with the file's tail: a tree a line or two behind (a crash between the two writes) is
caught up, anything else (no tree, a damaged one, a log written without it) is rebuilt from all
the files; at opening, the tree's root at the latest checkpoint's size must also be the one that
checkpoint recorded. ``tree_head``, ``inclusion_proof`` and ``consistency_proof`` read it under the lock;
``record_checkpoint`` appends a signed checkpoint as an ``audit.checkpoint`` record and keeps the
latest note in ``checkpoint`` in that directory.

**What the chain alone cannot detect**: removing records from the *end* of the newest file (or
the newest files), and rewriting the whole chain from some point on. Signed checkpoints of the
tree (``checkpoint.py``) close that gap: ``audit verify --checkpoint`` names the first record
that a checkpoint attests and the files no longer hold.
"""

from __future__ import annotations

import base64
import fcntl
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, TypeVar

from ..errors import AuditUnavailable, ConfigError
from .merkle import ProofError, consistency_proof, inclusion_proof, leaf_hash
from .records import (
    GENESIS,
    RECOVERY_EVENT,
    check_event,
    check_fields,
    encode_record,
    format_ts,
    line_hash,
    normalize_severity,
    parse_record,
)
from .tree import TreeStore, tree_dir

__all__ = ["CHECKPOINT_EVENT", "AuditLog", "FsyncPolicy", "rotated_files"]

CHECKPOINT_EVENT = "audit.checkpoint"
_CHECKPOINT_FILE = "checkpoint"

FsyncPolicy = Literal["always", "critical", "never"]
_T = TypeVar("_T")
DEFAULT_ROTATE_BYTES = 64 * 1024 * 1024
DEFAULT_PROBE_INTERVAL = 1.0  # seconds between re-open probes of a failed log (``health``)
_CANNOT_WRITE = "the audit log cannot be written"
_CHUNK = 64 * 1024


def rotated_files(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``[(n, path.NNNNNN), …]`` sorted by ``n``: the rotated files of the log at ``path``."""
    p = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(p)
    pattern = re.compile(re.escape(base) + r"\.(\d{6,})")
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def _read_tail_lines(fd: int, size: int) -> tuple[list[bytes], bool]:
    """The last lines of the file: ``(lines, at_bof)``; ``lines[-1]`` is the bytes after the last
    newline (``b""`` if the file ends with one). Reads back until it holds three newlines (two
    complete lines and the torn part) or reaches the beginning."""
    buf = b""
    pos = size
    while pos > 0 and buf.count(b"\n") < 3:
        n = min(_CHUNK, pos)
        pos -= n
        chunk = os.pread(fd, n, pos)
        if len(chunk) != n:
            raise OSError("short read from the audit log")
        buf = chunk + buf
    lines = buf.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # the first piece may be the middle of a line
    return lines, pos == 0


class AuditLog:
    """Append-only, hash-chained audit log (see the module docstring).

    ``record(event, severity, **fields)`` (also ``__call__``) is the audit callable the policy
    engine, the API key store and the server use."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        rotate_bytes: int | None = DEFAULT_ROTATE_BYTES,
        fsync_policy: FsyncPolicy = "critical",
        *,
        clock: Callable[[], float] = time.time,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        tree: bool = True,
    ) -> None:
        if fsync_policy not in ("always", "critical", "never"):
            raise ConfigError(f"audit fsync policy must be always, critical or never, not {fsync_policy!r}")
        if rotate_bytes is not None and rotate_bytes < 1:
            raise ConfigError("audit rotate_bytes must be positive (or None: never rotate)")
        self._path = os.path.abspath(os.fspath(path))
        self._dir = os.path.dirname(self._path)
        self._rotate_bytes = rotate_bytes
        self._fsync_policy = fsync_policy
        self._clock = clock
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._size = 0
        self._seq = 0
        self._last = GENESIS
        self._closed = False
        self._failure: str | None = None  # why the last append failed; None after a success
        self._probe_interval = probe_interval
        self._next_probe = 0.0  # time.monotonic() before which health() does not probe again
        self._tree: TreeStore | None = None
        self._want_tree = tree
        try:
            self._lock_fd = os.open(self._path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditUnavailable("the audit log cannot be opened") from exc
        try:
            with self._locked():
                self._sync()
        except OSError as exc:
            self._close_all()
            raise AuditUnavailable("the audit log cannot be opened") from exc
        except BaseException:
            self._close_all()
            raise

    # ---- public ---------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def last_seq(self) -> int:
        """``seq`` of the last record this writer knows of (0 for an empty log)."""
        return self._seq

    @property
    def head(self) -> str:
        """SHA-256 (hex) of the last record's line: the value to anchor elsewhere."""
        return self._last

    def record(self, event: str, severity: str, **fields: object) -> int:
        """Append one record; returns its ``seq``.

        ``AuditFieldRefused`` (nothing written) for a secret-looking or non-JSON field, an
        unknown severity or a bad event name; ``AuditUnavailable`` if it cannot be written."""
        check_event(event)
        sev = normalize_severity(severity)
        check_fields(fields)
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        ts = format_ts(self._clock())
        lock_fd = self._lock_fd
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # (what _locked() does, without a generator per record)
            try:
                self._sync()
                seq = self._append_record(ts, event, sev, fields)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except OSError as exc:
            self._close_fd()  # re-sync from disk next time (the write may have been partial)
            self._failure = _CANNOT_WRITE
            raise AuditUnavailable(_CANNOT_WRITE) from exc
        except AuditUnavailable as exc:  # the path is not a regular file
            self._failure = exc.message
            raise
        self._failure = None
        return seq

    __call__ = record

    def health(self) -> str | None:
        """None while records can be written, else why not (a fixed phrase: no path, no OS
        detail). See "Health" in the module docstring for what a failed log's probe does."""
        if self._closed:
            return "the audit log is closed"
        failure = self._failure
        if failure is None:
            return None
        now = time.monotonic()
        if now < self._next_probe:
            return failure
        self._next_probe = now + self._probe_interval
        try:
            with self._locked():
                self._sync()
        except OSError:
            self._close_fd()
            return failure
        except AuditUnavailable as exc:
            self._failure = exc.message
            return exc.message
        self._failure = None
        return None

    # ---- the Merkle tree ----------------------------------------------------------------------

    def _tree_op(self) -> TreeStore:
        """Take the lock's view of the tree (call with the lock held)."""
        self._sync()
        if self._tree is None:
            raise AuditUnavailable("the audit log keeps no Merkle tree")
        return self._tree

    def _with_tree(self, fn: Callable[[TreeStore], _T]) -> _T:
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        try:
            with self._locked():
                return fn(self._tree_op())
        except OSError as exc:
            self._close_fd()
            raise AuditUnavailable("the audit tree cannot be read") from exc

    def tree_head(self) -> tuple[int, bytes]:
        """``(size, root)`` of the tree of every line written so far."""
        return self._with_tree(lambda t: (t.size, t.root()))

    def root_at(self, size: int) -> bytes:
        """The root of the first ``size`` leaves (``ProofError`` beyond the tree)."""

        def get(t: TreeStore) -> bytes:
            if not 0 <= size <= t.size:
                raise ProofError(f"tree size {size} is beyond the tree ({t.size})")
            return t.root(size)

        return self._with_tree(get)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 inclusion proof of leaf ``index`` in the tree of size ``size``."""

        def get(t: TreeStore) -> list[bytes]:
            if size > t.size:
                raise ProofError(f"tree size {size} is beyond the tree ({t.size})")
            return inclusion_proof(t, index, size)

        return self._with_tree(get)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof between the trees of sizes ``first`` and ``second``."""

        def get(t: TreeStore) -> list[bytes]:
            if second > t.size:
                raise ProofError(f"tree size {second} is beyond the tree ({t.size})")
            return consistency_proof(t, first, second)

        return self._with_tree(get)

    def record_checkpoint(self, size: int, root: bytes, note: str) -> int:
        """Append a signed checkpoint (an ``audit.checkpoint`` record: size, root hex, note) and
        keep the note as the latest when it is the largest seen; returns the record's seq."""
        seq = self.record(CHECKPOINT_EVENT, "NOTICE", size=size, root=root.hex(), note=note)
        try:
            with self._locked():
                current = self.latest_checkpoint()
                if current is None or _note_size(current) < size:
                    path = os.path.join(tree_dir(self._path), _CHECKPOINT_FILE)
                    tmp = f"{path}.{os.getpid()}.tmp"
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                    with open(fd, "w", encoding="utf-8") as fh:
                        fh.write(note)
                    os.replace(tmp, path)
        except OSError as exc:
            raise AuditUnavailable("the audit checkpoint cannot be kept") from exc
        return seq

    def latest_checkpoint(self) -> str | None:
        """The latest signed checkpoint note (``record_checkpoint``), or None."""
        try:
            with open(os.path.join(tree_dir(self._path), _CHECKPOINT_FILE), encoding="utf-8") as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditUnavailable("the audit checkpoint cannot be read") from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_all()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog({self._path!r}, seq={self._seq})"

    # ---- internals (all called with the lock held) ------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._identity = None
            try:
                os.close(fd)
            except OSError:
                pass  # already unusable; the next call re-opens

    def _close_all(self) -> None:
        self._close_fd()
        if self._tree is not None:
            self._tree.close()
            self._tree = None
        try:
            os.close(self._lock_fd)
        except OSError:
            pass

    def _sync(self) -> None:
        """Make (fd, size, seq, last) describe the current file as it is on disk."""
        if self._fd is not None:
            try:
                st = os.stat(self._path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._identity and st.st_size == self._size:
                return  # the fast path: nobody else wrote since our last append
            self._close_fd()
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AuditUnavailable("the audit log path is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._identity = (st.st_dev, st.st_ino)
        self._size = st.st_size
        if st.st_size == 0:
            self._seq, self._last = self._rotated_tail()
            self._sync_tree(self._rotated_tail_lines())
            return
        lines, at_bof = _read_tail_lines(fd, st.st_size)
        self._sync_tree(lines[:-1])
        torn = lines[-1]
        complete = lines[:-1]
        if complete:
            last = complete[-1]
            rec = parse_record(last)
            if rec is not None:
                seq, prev_hash = rec.seq, line_hash(last)
            else:
                seq, prev_hash = self._seq_before(complete[:-1], at_bof), line_hash(last)
        else:  # the whole file is one torn line
            seq, prev_hash = self._rotated_tail()
            last = None
            rec = None
        self._seq, self._last = seq, prev_hash
        ts = format_ts(self._clock())
        if torn:
            self._append(b"\n", fsync=False)
            if self._tree is not None:
                self._tree.append(leaf_hash(torn))
            trec = parse_record(torn)
            if trec is not None and trec.seq == seq + 1 and trec.prev == prev_hash:
                self._seq, self._last = trec.seq, line_hash(torn)  # only the newline was missing
            else:
                self._append_record(
                    ts, RECOVERY_EVENT, "WARNING",
                    {"reason": "torn_tail", "torn_bytes": len(torn), "torn_sha256": line_hash(torn)},
                )
        elif last is not None and rec is None:
            self._append_record(
                ts, RECOVERY_EVENT, "WARNING",
                {"reason": "unparseable_tail", "line_sha256": prev_hash},
            )

    def _seq_before(self, lines: list[bytes], at_bof: bool) -> int:
        for line in reversed(lines):
            rec = parse_record(line)
            if rec is not None:
                return rec.seq + 1  # the unparseable line took (at least) one number
        return self._rotated_tail()[0] + 1 if at_bof else 0

    def _rotated_tail(self) -> tuple[int, str]:
        """(seq, hash) of the last record of the newest rotated file, or (0, GENESIS)."""
        files = rotated_files(self._path)
        if not files:
            return 0, GENESIS
        fd = os.open(files[-1][1], os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            lines, _ = _read_tail_lines(fd, size)
        finally:
            os.close(fd)
        complete = lines[:-1]
        if not complete:
            return 0, GENESIS
        rec = parse_record(complete[-1])
        seq = rec.seq if rec is not None else 0
        return seq, line_hash(complete[-1])

    def _rotated_tail_lines(self) -> list[bytes]:
        """The last complete lines of the newest rotated file (for the tree check)."""
        if not self._want_tree:
            return []
        files = rotated_files(self._path)
        if not files:
            return []
        fd = os.open(files[-1][1], os.O_RDONLY | os.O_CLOEXEC)
        try:
            lines, _ = _read_tail_lines(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return lines[:-1]

    def _append_record(self, ts: str, event: str, severity: str, fields: dict[str, object]) -> int:
        seq = self._seq + 1
        line = encode_record(seq, ts, event, severity, fields, self._last)
        if (
            self._rotate_bytes is not None
            and self._size > 0
            and self._size + len(line) + 1 > self._rotate_bytes
        ):
            self._rotate()
        fsync = self._fsync_policy == "always" or (
            self._fsync_policy == "critical" and severity == "CRITICAL"
        )
        self._append(line + b"\n", fsync=fsync)
        self._seq, self._last = seq, line_hash(line)
        if self._tree is not None:
            self._tree.append(leaf_hash(line))
        return seq

    def _sync_tree(self, tail: list[bytes]) -> None:
        """Bring the tree level with the files (see "The Merkle tree"); ``tail``: the last
        complete lines of the current file (empty: the file is empty)."""
        if not self._want_tree:
            return
        opening = self._tree is None
        if self._tree is None:
            self._tree = TreeStore(tree_dir(self._path))
        tree = self._tree
        try:
            tree.reload()
        except OSError:
            tree.truncate()
        last = tree.last_leaf()
        if tail and last is not None:
            for back in range(1, len(tail) + 1):
                if last == leaf_hash(tail[-back]):
                    for line in tail[len(tail) - back + 1 :]:
                        tree.append(leaf_hash(line))
                    if not opening or self._agrees_with_checkpoint(tree):
                        return
                    break
        elif not tail and last is None and not rotated_files(self._path):
            return
        tree.rebuild([p for _, p in rotated_files(self._path)] + [self._path])

    def _agrees_with_checkpoint(self, tree: TreeStore) -> bool:
        """At opening: the tree's root at the latest checkpoint's size is the one it recorded. A
        cheap check (O(log n) nodes): it finds a damaged node among those the roots are made of;
        one deeper inside shows only in the proofs that use it (which then fail to verify)."""
        note = self.latest_checkpoint()
        if note is None:
            return True
        lines = note.split("\n", 3)
        try:
            size, root = int(lines[1]), base64.b64decode(lines[2], validate=True)
        except (IndexError, ValueError):
            return True  # not a checkpoint this writer made: nothing to compare with
        return size > tree.size or tree.root(size) == root

    def _append(self, data: bytes, *, fsync: bool) -> None:
        fd = self._fd
        assert fd is not None
        n = os.write(fd, data)
        self._size += n
        if n != len(data):  # a short write (rare): write the rest
            view = memoryview(data)[n:]
            while view:
                n = os.write(fd, view)
                self._size += n
                view = view[n:]
        if fsync:
            os.fsync(fd)

    def _rotate(self) -> None:
        assert self._fd is not None
        if self._fsync_policy != "never":
            os.fsync(self._fd)
        files = rotated_files(self._path)
        n = files[-1][0] + 1 if files else 1
        os.rename(self._path, f"{self._path}.{n:06d}")
        self._close_fd()
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        self._fd, self._identity, self._size = fd, (st.st_dev, st.st_ino), 0
        if self._fsync_policy != "never":
            dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _note_size(note: str) -> int:
    """The tree size line of a checkpoint note (-1 if it has none)."""
    lines = note.split("\n", 2)
    return int(lines[1]) if len(lines) > 2 and lines[1].isdigit() else -1
