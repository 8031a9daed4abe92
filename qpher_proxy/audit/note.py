"""C2SP signed notes carrying tlog-checkpoint bodies (pure: no I/O, no trio).

Theory of operation
-------------------
**Signed note** (https://c2sp.org/signed-note). A note is UTF-8 text ending in a newline,
then a blank line, then one or more signature lines::

    <text, ending in \\n>
    \\n
    — <key name> <base64(key id (4 bytes) ‖ signature)>\\n

The dash is the em dash U+2014. The key name is non-empty and holds no Unicode space and no
``+``. The key id is ``SHA-256(name ‖ 0x0A ‖ type ‖ public key)[:4]``; a verifier key ("vkey")
is written ``<name>+<hex(key id)>+<base64(type ‖ public key)>``. The signature covers the note
text exactly (with its final newline, without the blank line). A verifier looks each
signature line up by (name, key id) among the keys it trusts, ignores lines of keys it does
not know, and accepts the note when every known key's signature verifies and at least one
does; a known key whose signature fails makes the whole note fail.

**Signature types.** Ed25519 is type ``0x01`` (the spec's): the signature is the 64-byte
RFC 8032 signature of the text. ML-DSA-65 has no type in the spec; following its rule for
types outside the registry, we use ``0xff`` followed by the ASCII identifier ``ML-DSA-65``
(``MLDSA65_TYPE``), as "type" both in the key-id hash and in the vkey; the signature is the
3309-byte FIPS 204 ML-DSA-65 signature of the text with the empty context, no prefix. Both of
a checkpoint's lines carry the same key name: the log's origin.

**Checkpoint** (https://c2sp.org/tlog-checkpoint): the note text is the origin line, the tree
size in decimal (no sign, no leading zero), the base64 root hash (32 bytes), then optional
extension lines, each line ending in a newline.

Parsing is strict (anything the specs forbid is ``NoteError``); verification never says which
signature failed or why (``NoteError("the note is not signed by a trusted key")``).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import sha256

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

__all__ = [
    "ED25519_TYPE",
    "MLDSA65_TYPE",
    "Checkpoint",
    "NoteError",
    "NoteSignature",
    "SignedNote",
    "Verifier",
    "format_checkpoint",
    "key_id",
    "open_note",
    "parse_checkpoint",
    "parse_note",
    "signature_line",
    "signed_note",
]

ED25519_TYPE = b"\x01"
MLDSA65_TYPE = b"\xff" + b"ML-DSA-65"
ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
MLDSA65_PUBLIC_BYTES = 1952  # FIPS 204 table 2
MLDSA65_SIGNATURE_BYTES = 3309
MAX_SIGNATURES = 100  # the spec lets a verifier refuse notes with more
_DASH = "\u2014"
_SIG_LINE = re.compile(r"\u2014 (\S+) ([A-Za-z0-9+/=]+)")
_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")


class NoteError(ValueError):
    """A note or checkpoint that does not parse, or does not verify."""


def _check_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() for c in name):
        raise NoteError(f"a key name must be non-empty, with no space and no '+', not {name!r}")


def key_id(name: str, sig_type: bytes, public_key: bytes) -> bytes:
    """``SHA-256(name ‖ 0x0A ‖ type ‖ public key)[:4]``."""
    return sha256(name.encode() + b"\n" + sig_type + public_key).digest()[:4]


@dataclass(frozen=True, slots=True)
class NoteSignature:
    name: str
    key_id: bytes  # 4 bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class SignedNote:
    text: str
    signatures: tuple[NoteSignature, ...]


def signature_line(name: str, kid: bytes, signature: bytes) -> str:
    """``— name base64(key id ‖ signature)\\n``."""
    _check_name(name)
    return f"{_DASH} {name} {base64.b64encode(kid + signature).decode()}\n"


def signed_note(text: str, lines: Sequence[str]) -> str:
    """The note: ``text``, the blank line, the signature ``lines`` (from ``signature_line``)."""
    if not text.endswith("\n") or not lines:
        raise NoteError("a note's text ends with a newline and it has at least one signature")
    return text + "\n" + "".join(lines)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NoteError(f"{what} is not valid base64") from exc


def parse_note(note: bytes | str) -> SignedNote:
    """Split a signed note into its text and signature lines (nothing is verified)."""
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NoteError("a note must be valid UTF-8") from exc
    if any(c < " " and c != "\n" for c in note):
        raise NoteError("a note must not hold control characters other than newline")
    if not note.endswith("\n"):
        raise NoteError("a note must end with a newline")
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("a note needs a blank line before its signatures")
    text, block = note[: split + 1], note[split + 2 :]
    sigs = []
    for line in block.split("\n")[:-1]:
        m = _SIG_LINE.fullmatch(line)
        if m is None:
            raise NoteError(f"not a signature line: {line[:80]!r}")
        raw = _b64(m.group(2), "a signature")
        if len(raw) < 5:
            raise NoteError("a signature must hold a key id and a signature")
        sigs.append(NoteSignature(m.group(1), raw[:4], raw[4:]))
    if not sigs:
        raise NoteError("a note needs at least one signature line")
    if len(sigs) > MAX_SIGNATURES:
        raise NoteError(f"a note may carry at most {MAX_SIGNATURES} signatures, not {len(sigs)}")
    return SignedNote(text, tuple(sigs))


@dataclass(frozen=True, slots=True)
class Verifier:
    """One trusted key: its name, type, public key (and key id)."""

    name: str
    sig_type: bytes
    public_key: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        expect = {ED25519_TYPE: ED25519_PUBLIC_BYTES, MLDSA65_TYPE: MLDSA65_PUBLIC_BYTES}.get(self.sig_type)
        if expect is None:
            raise NoteError(f"unsupported signature type {self.sig_type!r}")
        if len(self.public_key) != expect:
            raise NoteError(f"a public key of this type is {expect} bytes, not {len(self.public_key)}")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.sig_type, self.public_key)

    @property
    def algorithm(self) -> str:
        return "Ed25519" if self.sig_type == ED25519_TYPE else "ML-DSA-65"

    @classmethod
    def from_vkey(cls, vkey: str) -> Verifier:
        """Parse ``name+hex(key id)+base64(type ‖ public key)``; the key id must match."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
            raise NoteError("a vkey is name+keyid+key")
        raw = _b64(parts[2], "a vkey's key")
        for sig_type in (ED25519_TYPE, MLDSA65_TYPE):
            if raw.startswith(sig_type) and (
                sig_type != ED25519_TYPE or len(raw) == 1 + ED25519_PUBLIC_BYTES
            ):
                v = cls(parts[0], sig_type, raw[len(sig_type) :])
                break
        else:
            raise NoteError("a vkey of an unsupported signature type")
        if v.key_id.hex() != parts[1]:
            raise NoteError("the vkey's key id does not match its key")
        return v

    def vkey(self) -> str:
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(self.sig_type + self.public_key).decode()}"

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            if self.sig_type == ED25519_TYPE:
                if len(signature) != ED25519_SIGNATURE_BYTES:
                    return False
                ed25519.Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, text)
            else:
                if len(signature) != MLDSA65_SIGNATURE_BYTES:
                    return False
                mldsa.MLDSA65PublicKey.from_public_bytes(self.public_key).verify(signature, text)
        except (InvalidSignature, ValueError):
            return False
        return True


def open_note(note: bytes | str, verifiers: Iterable[Verifier], *, require_all: bool = False) -> SignedNote:
    """Parse and verify: every signature by a known key must verify and at least one must be
    known (``require_all``: every verifier given must have signed). Returns the note; its
    ``signatures`` are the verified ones."""
    n = parse_note(note)
    known = {(v.name, v.key_id): v for v in verifiers}
    text = n.text.encode()
    good = []
    for sig in n.signatures:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            continue
        if not v.verify(text, sig.signature):
            raise NoteError("the note is not signed by a trusted key")
        good.append(sig)
    if not good or (require_all and {(s.name, s.key_id) for s in good} != set(known)):
        raise NoteError("the note is not signed by a trusted key")
    return SignedNote(n.text, tuple(good))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()


def format_checkpoint(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """The tlog-checkpoint note text."""
    if not origin or "\n" in origin or size < 0 or len(root) != 32:
        raise NoteError("a checkpoint needs an origin line, a size >= 0 and a 32-byte root")
    for ext in extensions:
        if not ext or "\n" in ext:
            raise NoteError("a checkpoint extension is one non-empty line")
    lines = [origin, str(size), base64.b64encode(root).decode(), *extensions]
    return "".join(line + "\n" for line in lines)


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint note text (the part before the blank line)."""
    if not text.endswith("\n"):
        raise NoteError("a checkpoint ends with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or not lines[0] or any(not line for line in lines[3:]):
        raise NoteError("a checkpoint is an origin, a size and a root hash, one per line")
    if not _SIZE.fullmatch(lines[1]):
        raise NoteError(f"a checkpoint's size is a decimal number, not {lines[1][:24]!r}")
    root = _b64(lines[2], "the root hash")
    if len(root) != 32:
        raise NoteError(f"the root hash is 32 bytes, not {len(root)}")
    return Checkpoint(lines[0], int(lines[1]), root, tuple(lines[3:]))
