"""``python -m qpher_proxy.kms.worker --fd N [--kek-fd M] [--user UID:GID]``: one KMS worker.

Started by the supervisor (``kms/launcher``), never imported by it.

Hardening runs before anything else is imported or read; see ``service.py`` for the rest.
``--user``: the worker was started as root and becomes that user once its backend is loaded
and before it opens the key store (see ``qpher_proxy.sandbox``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd: int | None = None
    kek_fd: int | None = None
    user: str | None = None
    try:
        i = 0
        while i < len(args):
            if args[i] == "--fd":
                fd = int(args[i + 1])
            elif args[i] == "--kek-fd":
                kek_fd = int(args[i + 1])
            elif args[i] == "--user":
                user = args[i + 1]
                uid, _, gid = user.partition(":")
                if int(uid) <= 0 or int(gid) < 0:
                    raise ValueError(user)
            else:
                raise ValueError(args[i])
            i += 2
    except (IndexError, ValueError):
        print("usage: python -m qpher_proxy.kms.worker --fd N [--kek-fd M]", file=sys.stderr)
        return 64
    if fd is None or fd < 3 or (kek_fd is not None and kek_fd < 3):
        print(
            "usage: python -m qpher_proxy.kms.worker --fd N [--kek-fd M] (descriptors >= 3)", file=sys.stderr
        )
        return 64

    from . import _hardening

    _hardening.close_inherited_fds({fd} | ({kek_fd} if kek_fd is not None else set()))
    notes = _hardening.disable_core_dumps()
    # With --user, memory is locked after the uid change (see service._become).
    locked, lock_note = _hardening.lock_memory() if user is None else (False, "")

    import logging

    from ...logs import configure_logging

    configure_logging("info", "json", sys.stderr)
    log = logging.getLogger("qpher.kms.worker")
    for note in notes:
        log.warning(note)
    if lock_note:
        (log.info if locked else log.warning)(lock_note)

    from ...sandbox import RunAs
    from .service import EXIT_INTERNAL, run_worker

    try:
        return run_worker(fd, kek_fd, notes={"memory_locked": locked},
                          user=RunAs.from_arg(user) if user else None)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # a bug: one line, no traceback (which could show local data)
        log.critical("KMS worker crashed", extra={"fields": {"exc_type": type(exc).__name__}})
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
