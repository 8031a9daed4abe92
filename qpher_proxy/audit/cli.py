"""``qpher-proxy audit verify [--vkey FILE… --checkpoint FILE…] FILE…``: check the hash chain, and
the files against signed checkpoints, one line per finding.

Files are put in rotation order first — ``FILE.000001``, ``FILE.000002``, …, then ``FILE``
(the current file) — so ``audit verify audit.log*`` does the right thing; files that are not
part of a rotation family keep their order after it. With ``--checkpoint`` (and the ``--vkey``
files of the log's verifier keys, one vkey per file or per line), the checkpoints' signatures,
their consistency and the inclusion of every line up to each checkpoint's size are checked too
(``tlog.py``); a missing or altered record names its index; lines after the last checkpoint are
reported as not yet attested (a note). Exit status: 0 when the chain and the checkpoints hold
(notes, such as a torn line accounted for by a recovery record, do not fail it), 1 when there
is any finding, 2 for a usage error.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TextIO

from .note import NoteError, Verifier
from .tlog import verify_checkpoints
from .verify import verify

__all__ = ["main_remote", "main_verify", "rotation_order"]

_ROTATED = re.compile(r"(.*)\.(\d{6,})")


def rotation_order(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``paths`` with each log's rotated files (by number) before the log itself."""
    names = [os.fspath(p) for p in paths]
    bases = {m.group(1) for n in names if (m := _ROTATED.fullmatch(n))}

    def key(item: tuple[int, str]) -> tuple[int, str, int, int]:
        index, name = item
        m = _ROTATED.fullmatch(name)
        if m and m.group(1) in bases:
            return (0, m.group(1), int(m.group(2)), index)
        if name in bases:
            return (0, name, sys.maxsize, index)
        return (1, "", 0, index)

    return [name for _, name in sorted(enumerate(names), key=key)]


def _read_vkeys(files: Sequence[str]) -> list[Verifier]:
    out = []
    for name in files:
        with open(name, encoding="utf-8") as fh:
            out += [Verifier.from_vkey(line) for line in fh.read().splitlines() if line.strip()]
    return out


def main_verify(
    paths: Sequence[str | os.PathLike[str]],
    *,
    from_middle: bool = False,
    out: TextIO | None = None,
    vkeys: Sequence[str] = (),
    checkpoints: Sequence[str] = (),
) -> int:
    out = out if out is not None else sys.stdout
    if not paths or (checkpoints and not vkeys):
        print("usage: qpher-proxy audit verify [--vkey FILE... --checkpoint FILE...] FILE...",
              file=sys.stderr)
        return 2
    ordered = rotation_order(paths)
    tree_ok = True
    if checkpoints:
        try:
            verifiers = _read_vkeys(vkeys)
            notes = []
            for name in checkpoints:
                with open(name, encoding="utf-8") as fh:
                    notes.append(fh.read())
        except (OSError, NoteError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report = verify_checkpoints(ordered, notes, verifiers)
        for cp in report.checkpoints:
            print(f"checkpoint: {cp.origin} size {cp.size} root {cp.root.hex()} "
                  f"(signed by {', '.join(v.algorithm for v in verifiers)})", file=out)
        for text in report.notes:
            print(f"note: {text}", file=out)
        for problem in report.problems:
            print(f"FAILED: {problem}", file=out)
        tree_ok = report.ok
        if tree_ok and report.checkpoints:
            top = max(cp.size for cp in report.checkpoints)
            print(f"ok: lines 0..{top - 1} are included in the checkpoint's tree", file=out)
    result = verify(ordered, from_middle=from_middle)
    for note in result.notes:
        print(f"note: {note}", file=out)
    for finding in result.findings:
        print(str(finding), file=out)
    if result.ok and tree_ok:
        print(
            f"ok: {result.records} records in {result.files} file(s), last seq {result.last_seq}, "
            f"head sha256 {result.head}",
            file=out,
        )
        return 0
    if not result.ok:
        print(f"FAILED: {len(result.findings)} finding(s) in {result.records} records", file=out)
    return 1


def main_remote(
    action: str, *, url: str, cacert: str, api_key: str | None, out: TextIO | None = None
) -> int:
    """``audit checkpoint`` (POST /v1/audit/checkpoint: an admin key) and ``audit vkeys``
    (GET /v1/audit/vkeys: an audit or admin key) against the running proxy at ``url``: the
    checkpoint is signed by its KMS, which holds the keys. Prints the answer (a signed note, or
    one vkey per line)."""
    out = out if out is not None else sys.stdout
    if not api_key:
        print("qpher-proxy: set the API key variable (--api-key-env) to a key with the audit or admin scope",
              file=sys.stderr)
        return 2
    path = "/v1/audit/checkpoint" if action == "checkpoint" else "/v1/audit/vkeys"
    req = urllib.request.Request(url.rstrip("/") + path, method="POST" if action == "checkpoint" else "GET")
    req.add_header("authorization", f"Bearer {api_key}")
    try:
        ctx = ssl.create_default_context(cafile=cacert)
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:  # noqa: S310 (https only)
            out.write(resp.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(errors="replace"), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        print(f"qpher-proxy: cannot reach {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover - python -m qpher_proxy.audit.cli FILE...
    raise SystemExit(main_verify(sys.argv[1:]))
