"""The transparent audit log: per-record overhead of the Merkle tree, proofs and checkpoints at 10⁶ records.

    python -m qpher_proxy_bench.audit_bench --quick
    python -m qpher_proxy_bench.audit_bench --leaves 1000000 --json

Figures:

* ``record``      µs per ``AuditLog.record`` with the tree and without it (``tree=False``), same
                  record, same directory, fsync policy "never" (the request path's default for
                  non-CRITICAL records is no fsync either): the difference is the tree's cost on
                  the request path (one leaf hash, ~1 node hash, ~2 small ``os.write``);
* ``tree``        a tree of ``--leaves`` leaves in its node file (``TreeStore``), built leaf by leaf;
                  its size on disk;
* ``proofs``      inclusion proof (a middle leaf, the last leaf) and consistency proofs (from
                  n/2 + 1 and from n - 1000 to n): µs to make from the files, µs to verify, hashes
                  and bytes (base64 JSON as ``GET /v1/audit/proof/*`` answers);
* ``checkpoint``  the KMS's work to sign one checkpoint: verify the consistency proof from the
                  last signed size, ML-DSA-65 sign and Ed25519 sign the body (in-process, with
                  ``cryptography``; the KMS round trip is not included), and the note's size.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from qpher_proxy.audit import AuditLog
from qpher_proxy.audit.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from qpher_proxy.audit.note import (
    ED25519_TYPE,
    MLDSA65_TYPE,
    Verifier,
    format_checkpoint,
    signature_line,
    signed_note,
)
from qpher_proxy.audit.tree import TreeStore


def _best_us(fn: Callable[[], object], n: int, repeat: int = 5) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return min(runs)


def _record_us(directory: str, tree: bool, n: int) -> float:
    path = os.path.join(directory, f"audit-{int(tree)}.log")
    with AuditLog(path, rotate_bytes=None, fsync_policy="never", tree=tree) as log:
        fields = {"tenant_id": "t-1234", "key_id": "k-0123456789", "operation": "sign", "outcome": "allow"}
        for _ in range(1000):
            log.record("policy.decision", "info", **fields)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                log.record("policy.decision", "info", **fields)
            runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def _proof_bytes(hashes: list[bytes]) -> int:
    return len(json.dumps({"hashes": [base64.b64encode(h).decode() for h in hashes]}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qpher-proxy bench audit", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^5 leaves, fewer records")
    ap.add_argument("--leaves", type=int, default=1_000_000, help="tree leaves (default 10^6)")
    ap.add_argument("--records", type=int, default=20_000, help="audit records timed per run (default 20000)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    n = 100_000 if args.quick else args.leaves
    records = 4000 if args.quick else args.records
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qpher-bench-audit-") as d:
        with_tree = _record_us(d, True, records)
        without = _record_us(d, False, records)
        out["record_us"] = {"with_tree": round(with_tree, 2), "without_tree": round(without, 2),
                            "tree_overhead": round(with_tree - without, 2)}
        store = TreeStore(os.path.join(d, "tree"))
        t0 = time.perf_counter()
        for i in range(n):
            store.append(leaf_hash(i.to_bytes(8, "big")))
        build = time.perf_counter() - t0
        disk = sum(os.path.getsize(os.path.join(store.directory, f)) for f in os.listdir(store.directory))
        out["tree"] = {"leaves": n, "build_s": round(build, 2), "us_per_leaf": round(build / n * 1e6, 2),
                       "bytes_on_disk": disk}
        root = store.root()
        proofs: dict[str, Any] = {}
        for name, index in (("inclusion_middle", n // 2), ("inclusion_last", n - 1)):
            p = inclusion_proof(store, index, n)
            leaf = store.node(0, index)

            def check(p: list[bytes] = p, i: int = index, lf: bytes = leaf) -> None:
                verify_inclusion(i, n, lf, p, root)

            def make(i: int = index) -> None:
                inclusion_proof(store, i, n)

            proofs[name] = {
                "hashes": len(p), "json_bytes": _proof_bytes(p),
                "make_us": round(_best_us(make, 50), 1),
                "verify_us": round(_best_us(check, 200), 1),
            }
        for name, first in (("consistency_half", n // 2 + 1), ("consistency_last_1000", n - 1000)):
            p = consistency_proof(store, first, n)
            r1 = store.root(first)

            def check_c(p: list[bytes] = p, f: int = first, r: bytes = r1) -> None:
                verify_consistency(f, n, p, r, root)

            def make_c(f: int = first) -> None:
                consistency_proof(store, f, n)

            proofs[name] = {
                "first": first, "hashes": len(p), "json_bytes": _proof_bytes(p),
                "make_us": round(_best_us(make_c, 50), 1),
                "verify_us": round(_best_us(check_c, 200), 1),
            }
        out["proofs"] = proofs
        ml, ed = mldsa.MLDSA65PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        origin = "qpher-proxy/bench"
        vm = Verifier(origin, MLDSA65_TYPE, ml.public_key().public_bytes_raw())
        ve = Verifier(origin, ED25519_TYPE, ed.public_key().public_bytes_raw())
        first = n - 1000
        cproof, r1 = consistency_proof(store, first, n), store.root(first)

        def sign() -> str:
            verify_consistency(first, n, cproof, r1, root)
            text = format_checkpoint(origin, n, root)
            body = text.encode()
            return signed_note(text, [signature_line(origin, vm.key_id, ml.sign(body)),
                                      signature_line(origin, ve.key_id, ed.sign(body))])

        note = sign()
        out["checkpoint"] = {
            "sign_us": round(_best_us(sign, 50), 1),
            "mldsa65_sign_us": round(_best_us(lambda: ml.sign(b"x" * 80), 50), 1),
            "ed25519_sign_us": round(_best_us(lambda: ed.sign(b"x" * 80), 200), 1),
            "note_bytes": len(note.encode()),
        }
        store.close()
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    r = out["record_us"]
    print(f"audit record (fsync never): {r['with_tree']} us with the tree, {r['without_tree']} us without: "
          f"+{r['tree_overhead']} us per record")
    t = out["tree"]
    print(f"tree of {t['leaves']} leaves: built in {t['build_s']} s ({t['us_per_leaf']} us/leaf), "
          f"{t['bytes_on_disk'] / 1e6:.1f} MB of node file")
    for name, p in out["proofs"].items():
        print(f"{name:>22}: {p['hashes']} hashes, {p['json_bytes']} B JSON, make {p['make_us']} us, "
              f"verify {p['verify_us']} us")
    c = out["checkpoint"]
    print(f"checkpoint signing (consistency check + ML-DSA-65 + Ed25519): {c['sign_us']} us "
          f"(ML-DSA-65 {c['mldsa65_sign_us']} us, Ed25519 {c['ed25519_sign_us']} us); "
          f"note {c['note_bytes']} B")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
