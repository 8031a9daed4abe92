"""The response headers a browser and a scanner expect from a security gateway, built once.

Two kinds of responses leave the server:

- **Its own** (JSON answers, errors, ``/healthz``, ``/readyz``, ``/metrics``): they carry
  ``Cache-Control: no-store``, because a decrypted plaintext, a shared secret or a key list
  must never be kept by a browser or an intermediary cache, and ``X-Content-Type-Options:
  nosniff``, so a browser never reads a JSON body as HTML or script. ``Strict-Transport-Security``
  is added when ``hsts_max_age`` is set; it stays off by default because a browser that saw it
  once refuses a later dev certificate it does not trust, with no way to click through.
- **Forwarded** ones (sidecar): the upstream owns their caching, so ``Cache-Control`` is never
  added or changed -- a proxy that marked an app's public assets ``no-store`` would defeat
  its caching, and nginx's ``proxy_pass`` never touches the header either. ``nosniff`` and
  HSTS are added only where the upstream sent none of its own, as nginx users get from
  ``add_header ... always`` at the server level with ``proxy_hide_header`` for the upstream's
  copy: nosniff only makes a browser trust the ``Content-Type`` the app chose, and HSTS is a
  property of the TLS endpoint, which is this proxy. An upstream's own values win, so
  the browser never sees two that disagree.

Every value is prebuilt here as h11 header items, so the per-response cost is one
``list.extend`` (own) or one pass over the upstream's header names (forwarded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SecurityHeaders", "HSTS_MAX_AGE_LIMIT"]

HSTS_MAX_AGE_LIMIT = 10 * 365 * 86_400  # seconds; browsers cap it lower (Chrome: 1 year)

Item = tuple[bytes, bytes, bytes]  # (raw name, lower-case name, value), as h11 keeps headers

_CACHE_CONTROL = b"cache-control"
_NOSNIFF = b"x-content-type-options"
_HSTS = b"strict-transport-security"


@dataclass(frozen=True, slots=True)
class SecurityHeaders:
    """Which security headers the server adds. Derived, once: ``own`` (h11 items for the
    server's own responses), ``own_block`` (the same as raw header lines, for a response
    written without h11) and ``forwarded`` (added to a forwarded response where it lacks them)."""

    hsts_max_age: int | None = None
    own: tuple[Item, ...] = field(init=False, repr=False, compare=False)
    own_block: bytes = field(init=False, repr=False, compare=False)
    forwarded: tuple[Item, ...] = field(init=False, repr=False, compare=False)
    # pre-built response heads by (status, handler headers), filled by the response writer
    heads: dict[tuple[int, tuple[tuple[bytes, bytes], ...]], bytes] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        age = self.hsts_max_age
        if age is not None and (type(age) is not int or not 0 <= age <= HSTS_MAX_AGE_LIMIT):
            raise ValueError(f"hsts_max_age must be an int in 0..{HSTS_MAX_AGE_LIMIT} or None, got {age!r}")
        nosniff: Item = (_NOSNIFF, _NOSNIFF, b"nosniff")
        own: list[Item] = [(_CACHE_CONTROL, _CACHE_CONTROL, b"no-store"), nosniff]
        forwarded: list[Item] = [nosniff]
        if age is not None:
            hsts: Item = (_HSTS, _HSTS, b"max-age=%d" % age)
            own.append(hsts)
            forwarded.append(hsts)
        object.__setattr__(self, "own", tuple(own))
        object.__setattr__(
            self, "own_block", b"".join(name + b": " + value + b"\r\n" for name, _, value in own)
        )
        object.__setattr__(self, "forwarded", tuple(forwarded))
        object.__setattr__(self, "heads", {})

    def missing_from(self, items: list[Item]) -> list[Item]:
        """The ``forwarded`` headers that ``items`` (a forwarded response's) lacks."""
        present = {item[1] for item in items}
        return [item for item in self.forwarded if item[1] not in present]
