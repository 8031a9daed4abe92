"""The gateway's checkpointer against a KMS's audit keys (in process): when checkpoints are due,
two processes of one node sharing the log and the KMS, and the routes' proof parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qpher_proxy.audit import AuditLog
from qpher_proxy.audit.note import Verifier, open_note, parse_checkpoint
from qpher_proxy.context import TenantContext
from qpher_proxy.errors import InvalidProofRequest
from qpher_proxy.http import Request
from qpher_proxy.kms.worker.audit_keys import AuditKeys
from qpher_proxy.kms.worker.backends import select_backend
from qpher_proxy.kms.worker.kek import FileKEKProvider, generate_kek_file
from qpher_proxy.kms.worker.keystore import KeyStore
from qpher_proxy.server.audit_routes import AuditRoutes, Checkpointer


class InProcessKMS:
    """The two KMS operations, answered by AuditKeys on a real key store."""

    def __init__(self, store: KeyStore) -> None:
        self.keys = AuditKeys(store)
        self.calls: list[str] = []

    async def audit_vkeys(self, ctx: TenantContext, origin: str) -> dict[str, Any]:
        self.calls.append("vkeys")
        return dict(self.keys.vkeys({"origin": origin}))  # type: ignore[arg-type]

    async def audit_sign_checkpoint(self, ctx: TenantContext, origin: str, size: int, root: bytes,
                                    consistency: list[bytes]) -> dict[str, Any]:
        self.calls.append(f"sign {size}")
        return dict(self.keys.sign_checkpoint(  # type: ignore[arg-type]
            {"origin": origin, "size": size, "root": root, "consistency": list(consistency)}))


@pytest.fixture
def kms(tmp_path: Path) -> Any:
    kek = tmp_path / "kek.b64"
    generate_kek_file(kek)
    store = KeyStore(tmp_path / "kms", FileKEKProvider(kek), select_backend("openssl"))
    yield InProcessKMS(store)
    store.close()


def _fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.record("test.event", "info", n=i)


async def test_two_processes_of_a_node_share_one_signed_history(tmp_path: Path, kms: InProcessKMS) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as a_log, AuditLog(path) as b_log:
        a = Checkpointer(a_log, kms, "node.example/audit")
        b = Checkpointer(b_log, kms, "node.example/audit")
        _fill(a_log, 5)
        await b.vkeys()  # b learns the KMS's last size now (0) and keeps it
        note_a = await a.checkpoint()
        _fill(b_log, 3)
        note_b = await b.checkpoint()  # stale: 409, learns size 5, proves from there
        assert kms.calls == ["vkeys", "vkeys", "sign 5", "sign 9", "vkeys", "sign 9"]
        verifiers = [Verifier.from_vkey(v) for v in await a.vkeys()]
        sizes = [parse_checkpoint(open_note(n, verifiers, require_all=True).text).size
                 for n in (note_a, note_b)]
        assert sizes == [5, 9]  # 5 records, a checkpoint record, 3 records
        assert a_log.latest_checkpoint() == note_b


async def test_checkpoints_are_due_after_records_or_interval_and_not_when_idle(
    tmp_path: Path, kms: InProcessKMS, autojump_clock: trio.testing.MockClock
) -> None:
    with AuditLog(tmp_path / "audit.log") as log:
        cp = Checkpointer(log, kms, "node.example/audit", interval=60, records=10)
        async with trio.open_nursery() as nursery:
            await nursery.start(cp.run)
            _fill(log, 9)
            await trio.sleep(5)
            assert log.latest_checkpoint() is None  # 9 lines, 5 s: not yet
            _fill(log, 1)
            await trio.sleep(1.5)
            latest = log.latest_checkpoint()
            assert latest is not None and parse_checkpoint(latest.split("\n\n")[0] + "\n").size == 10
            signed = len([c for c in kms.calls if c.startswith("sign")])
            await trio.sleep(300)  # idle: only the checkpoint's own record is new
            assert len([c for c in kms.calls if c.startswith("sign")]) == signed
            _fill(log, 2)
            await trio.sleep(61)  # two lines and a whole interval
            assert len([c for c in kms.calls if c.startswith("sign")]) == signed + 1
            nursery.cancel_scope.cancel()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def _req(query: str) -> Request:
    return Request(method="GET", target="/x?" + query, path="/x", query=query, headers=[],
                   http_version="1.1", request_id="r", client_addr="127.0.0.1")


async def test_proof_parameters_are_checked(tmp_path: Path, kms: InProcessKMS) -> None:
    with AuditLog(tmp_path / "audit.log") as log:
        _fill(log, 4)
        routes = AuditRoutes(log, Checkpointer(log, kms))
        resp = await routes.handle("audit.proof.inclusion", _req("index=1&tree_size=4"))
        assert json.loads(resp.body)["tree_size"] == 4 and len(json.loads(resp.body)["hashes"]) == 2
        for bad in ("", "index=1", "index=1&index=2&tree_size=4", "index=01&tree_size=4",
                    "index=4&tree_size=4", "index=0&tree_size=5", "index=0&tree_size=4&x=1",
                    "index=%ff&tree_size=4"):
            with pytest.raises(InvalidProofRequest):
                await routes.handle("audit.proof.inclusion", _req(bad))
        resp = await routes.handle("audit.proof.consistency", _req("first=2&second=4"))
        assert json.loads(resp.body) == {"first": 2, "second": 4, "hashes": json.loads(resp.body)["hashes"]}
