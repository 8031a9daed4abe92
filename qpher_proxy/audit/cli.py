"""``qpher-proxy audit verify FILE…``: check the hash chain, one line per finding.

Files are put in rotation order first — ``FILE.000001``, ``FILE.000002``, …, then ``FILE``
(the current file) — so ``audit verify audit.log*`` does the right thing; files that are not
part of a rotation family keep their order after it. Exit status: 0 when the chain holds
(notes, such as a torn line accounted for by a recovery record, do not fail it), 1 when there
is any finding, 2 for a usage error.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import TextIO

from .verify import verify

__all__ = ["main_verify", "rotation_order"]

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


def main_verify(
    paths: Sequence[str | os.PathLike[str]], *, from_middle: bool = False, out: TextIO | None = None
) -> int:
    out = out if out is not None else sys.stdout
    if not paths:
        print("usage: qpher-proxy audit verify FILE...", file=sys.stderr)
        return 2
    ordered = rotation_order(paths)
    result = verify(ordered, from_middle=from_middle)
    for note in result.notes:
        print(f"note: {note}", file=out)
    for finding in result.findings:
        print(str(finding), file=out)
    if result.ok:
        print(
            f"ok: {result.records} records in {result.files} file(s), last seq {result.last_seq}, "
            f"head sha256 {result.head}",
            file=out,
        )
        return 0
    print(f"FAILED: {len(result.findings)} finding(s) in {result.records} records", file=out)
    return 1


if __name__ == "__main__":  # pragma: no cover - python -m qpher_proxy.audit.cli FILE...
    raise SystemExit(main_verify(sys.argv[1:]))
