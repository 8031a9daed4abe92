"""The transparent audit log on the gateway: signed checkpoints on a schedule, and ``/v1/audit/*``.

Theory of operation
-------------------
**Checkpoints** (``Checkpointer``). The gateway computes the tree head ``(size, root)`` of its
audit log (``AuditLog.tree_head``, under the log's lock) and asks the KMS to sign it
(``audit_sign_checkpoint``) with a consistency proof from the last size the KMS signed for the
log's origin; the KMS signs only a checkpoint that extends what it signed before (see
``kms/worker/audit_keys.py``), so this process never holds a key that could sign a fork. The
signed note is then appended to the log as an ``audit.checkpoint`` record (itself a leaf of
the next checkpoint) and kept as the latest (``AuditLog.latest_checkpoint``).

A checkpoint is made every ``interval`` seconds or once ``records`` lines were added since the
last one, whichever comes first, and only when the tree grew by more than the last checkpoint's
own record: an idle log is not signed again and again. ``run`` looks once a second (the look is
a lock, a ``stat`` and a compact-range root: microseconds). Several gateway processes of one
node share the log and its tree; each runs a checkpointer, and the latest checkpoint on disk is
what they all compare with, so a node makes about one checkpoint per trigger, not one per
process. A process whose idea of the KMS's last size is stale gets 409 checkpoint_inconsistent
naming it, and tries once more from there.

**Routes** (``AuditRoutes``): ``GET /v1/audit/checkpoint`` (the latest note, text/plain),
``GET /v1/audit/proof/inclusion?index=&tree_size=``, ``GET /v1/audit/proof/consistency?first=&second=``
(JSON, base64 hashes), ``GET /v1/audit/vkeys`` (text/plain, one vkey per line) — authorized by
the policy (the shipped policies allow the ``audit`` and ``admin`` scopes) — and
``POST /v1/audit/checkpoint`` (admin scope: make one now; answers the note).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
from typing import Any
from urllib.parse import parse_qs

import trio

from ..api.validation import load_object
from ..audit import AuditLog
from ..audit.merkle import ProofError
from ..context import TenantContext
from ..errors import (
    BadRequest,
    CheckpointInconsistent,
    CheckpointNotFound,
    InvalidProofRequest,
    NotFound,
    QpherError,
)
from ..http import Request, Response

__all__ = ["AuditRoutes", "Checkpointer", "default_origin"]

log = logging.getLogger("qpher.audit")

AUDIT_CONTEXT_TENANT = "qpher:audit"  # the KMS frames' tenant field for the node's own audit log
DEFAULT_CHECKPOINT_INTERVAL = 60.0  # seconds (config audit.checkpoint_interval)
DEFAULT_CHECKPOINT_RECORDS = 1000  # lines (config audit.checkpoint_records)
POLL_INTERVAL = 1.0  # seconds between looks at the tree (run)
_TEXT = ((b"content-type", b"text/plain; charset=utf-8"),)
_MAX_SIZE = 2**63 - 1
_INT = re.compile(r"0|[1-9][0-9]{0,18}")


def default_origin() -> str:
    """``qpher-proxy/<hostname>``: the checkpoint's origin line and key name when none is set."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "localhost"
    return f"qpher-proxy/{host}"


class Checkpointer:
    """Makes signed checkpoints of ``audit`` through ``kms`` (see the module docstring)."""

    def __init__(
        self,
        audit: AuditLog,
        kms: Any,
        origin: str | None = None,
        *,
        interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        records: int = DEFAULT_CHECKPOINT_RECORDS,
    ) -> None:
        self.audit = audit
        self.kms = kms
        self.origin = origin or default_origin()
        self.interval = interval
        self.records = records
        self._kms_size: int | None = None  # the last size the KMS signed for the origin, as we know it
        self._vkeys: list[str] | None = None
        self._lock = trio.Lock()
        self._last_time = 0.0  # trio.current_time() of the last checkpoint (run starts the clock)

    def _ctx(self) -> TenantContext:
        return TenantContext(AUDIT_CONTEXT_TENANT, f"audit-checkpoint-{os.getpid()}", "-")

    async def vkeys(self) -> list[str]:
        """The verifier keys (ML-DSA-65, Ed25519) of the origin, from the KMS (cached)."""
        if self._vkeys is None:
            info = await self.kms.audit_vkeys(self._ctx(), self.origin)
            self._vkeys, self._kms_size = list(info["vkeys"]), int(info["size"])
        return self._vkeys

    async def checkpoint(self) -> str:
        """Sign the tree as it is now and record the checkpoint; returns the note."""
        async with self._lock:
            size, root = self.audit.tree_head()
            if self._kms_size is None:
                await self.vkeys()
            for attempt in range(2):
                first = self._kms_size or 0
                if first > size:  # another process of this node signed further: prove from there
                    raise CheckpointInconsistent(f"the KMS signed size {first}; this log holds {size}")
                proof = self.audit.consistency_proof(first, size) if 0 < first < size else []
                try:
                    answer = await self.kms.audit_sign_checkpoint(self._ctx(), self.origin, size, root, proof)
                    break
                except QpherError as exc:
                    if exc.code != "checkpoint_inconsistent" or attempt:
                        raise
                    info = await self.kms.audit_vkeys(self._ctx(), self.origin)  # learn its last size
                    self._kms_size = int(info["size"])
            note = str(answer["note"])
            self._vkeys = list(answer["vkeys"])
            self._kms_size = size
            self.audit.record_checkpoint(size, root, note)
            self._last_time = trio.current_time()
            log.info("audit checkpoint signed", extra={"fields": {"size": size, "origin": self.origin}})
            return note

    def _due(self, now: float) -> bool:
        size, _ = self.audit.tree_head()
        latest = self.audit.latest_checkpoint()
        signed = _note_size(latest) if latest is not None else -1
        new_lines = size - signed - 1  # beyond the last checkpoint's own record
        if new_lines <= 0:
            self._last_time = now
            return False
        return new_lines >= self.records or now - self._last_time >= self.interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Checkpoint whenever due, until cancelled; a failure is logged and tried again later."""
        self._last_time = trio.current_time()
        task_status.started()
        while True:
            await trio.sleep(min(POLL_INTERVAL, self.interval))
            try:
                if self._due(trio.current_time()):
                    await self.checkpoint()
            except QpherError as exc:
                log.warning("audit checkpoint failed", extra={"fields": {"code": exc.code}})
                self._last_time = trio.current_time()  # not again before the next interval
            except Exception:  # a bug here must not end the gateway: say so, try again later
                log.error("audit checkpoint failed unexpectedly", exc_info=True)
                self._last_time = trio.current_time()


def _note_size(note: str) -> int:
    lines = note.split("\n", 2)
    return int(lines[1]) if len(lines) > 2 and lines[1].isdigit() else -1


def _query_ints(req: Request, *names: str) -> list[int]:
    try:
        q = parse_qs(req.query, keep_blank_values=True, strict_parsing=bool(req.query), max_num_fields=8)
    except ValueError as exc:
        raise InvalidProofRequest("the query string is not valid") from exc
    out = []
    for name in names:
        values = q.get(name)
        if not values or len(values) != 1 or not _INT.fullmatch(values[0]):
            raise InvalidProofRequest(f"{name} must be given once, as a non-negative integer")
        out.append(int(values[0]))
    extra = set(q) - set(names)
    if extra:
        raise InvalidProofRequest(f"unknown query parameter {sorted(extra)[0][:40]!r}")
    return out


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


class AuditRoutes:
    """Serves the ``audit.*`` operations (see the module docstring)."""

    def __init__(self, audit: AuditLog, checkpointer: Checkpointer) -> None:
        self.audit = audit
        self.checkpointer = checkpointer

    async def handle(self, operation: str, req: Request) -> Response:
        if operation == "audit.checkpoint.read":
            note = self.audit.latest_checkpoint()
            if note is None:
                raise CheckpointNotFound("no checkpoint of the audit log has been signed yet")
            return Response(200, _TEXT, note.encode())
        if operation == "audit.checkpoint.create":
            if load_object(await req.read_body(), allow_empty=True):  # no body, or {}
                raise BadRequest("POST /v1/audit/checkpoint takes no fields", code="invalid_input")
            return Response(200, _TEXT, (await self.checkpointer.checkpoint()).encode())
        if operation == "audit.vkeys":
            return Response(200, _TEXT, "".join(f"{v}\n" for v in await self.checkpointer.vkeys()).encode())
        if operation == "audit.proof.inclusion":
            index, size = _query_ints(req, "index", "tree_size")
            try:
                hashes = self.audit.inclusion_proof(index, size)
            except ProofError as exc:
                raise InvalidProofRequest(str(exc)) from exc
            return Response.json(200, {"leaf_index": index, "tree_size": size, "hashes": _b64(hashes)})
        if operation == "audit.proof.consistency":
            first, second = _query_ints(req, "first", "second")
            try:
                hashes = self.audit.consistency_proof(first, second)
            except ProofError as exc:
                raise InvalidProofRequest(str(exc)) from exc
            return Response.json(200, {"first": first, "second": second, "hashes": _b64(hashes)})
        raise NotFound("no such route", code="route_not_found")  # pragma: no cover
