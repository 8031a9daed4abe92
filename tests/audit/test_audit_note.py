"""C2SP signed notes and tlog-checkpoint bodies: Go sumdb/note vectors, an independent Ed25519
verifier written from the C2SP text, ML-DSA-65 lines checked with cryptography and dilithium-py."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from _audit_checkpoints import TestSigner
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from dilithium_py.ml_dsa import ML_DSA_65

from qpher_proxy.audit.note import (
    ED25519_TYPE,
    MLDSA65_TYPE,
    NoteError,
    Verifier,
    format_checkpoint,
    key_id,
    open_note,
    parse_checkpoint,
    parse_note,
    signature_line,
)

SUMDB = json.loads((Path(__file__).parent.parent / "vectors" / "sumdb_note_ed25519.json").read_text())


def test_go_sumdb_vkey_and_note_verify() -> None:
    v = Verifier.from_vkey(SUMDB["vkey"])
    assert v.vkey() == SUMDB["vkey"] and v.key_id.hex() == "c74f20a3"
    assert open_note(SUMDB["note"], [v]).text == SUMDB["text"]
    with pytest.raises(NoteError):
        open_note(SUMDB["note"].replace("cryptography", "cryptographY"), [v])


def test_signing_with_the_go_sumdb_key_gives_the_go_note() -> None:
    seed = base64.b64decode(SUMDB["skey"].split("+", 4)[4])
    assert seed[0] == 1
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed[1:])
    v = Verifier.from_vkey(SUMDB["vkey"])
    assert key.public_key().public_bytes_raw() == v.public_key
    line = signature_line("PeterNeumann", v.key_id, key.sign(SUMDB["text"].encode()))
    assert SUMDB["text"] + "\n" + line == SUMDB["note"]


def _c2sp_open(note: str, vkey: str) -> str:
    """An independent signed-note verifier, from https://c2sp.org/signed-note alone."""
    name, hexid, b64key = vkey.split("+", 2)
    raw = base64.b64decode(b64key)
    assert raw[0] == 0x01
    assert hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4].hex() == hexid
    text, _, sigs = note.rpartition("\n\n")
    text += "\n"
    for line in sigs.splitlines():
        dash, signer, sig = line.split(" ")
        assert dash == "\u2014"
        blob = base64.b64decode(sig)
        if signer == name and blob[:4].hex() == hexid:
            ed25519.Ed25519PublicKey.from_public_bytes(raw[1:]).verify(blob[4:], text.encode())
            return text
    raise AssertionError("no signature by the key")


def test_checkpoint_lines_verify_independently() -> None:
    s = TestSigner()
    root = hashlib.sha256(b"root").digest()
    note = s.note(42, root)
    ml_v, ed_v = s.verifiers
    text = _c2sp_open(note, ed_v.vkey())
    assert text == f"{s.origin}\n42\n{base64.b64encode(root).decode()}\n"
    lines = note.split("\n\n", 1)[1].splitlines()
    assert len(lines) == 2 and all(line.startswith(f"\u2014 {s.origin} ") for line in lines)
    blob = base64.b64decode(lines[0].split(" ")[2])
    kid = hashlib.sha256(s.origin.encode() + b"\n" + b"\xffML-DSA-65" + ml_v.public_key).digest()[:4]
    assert blob[:4] == kid
    sig = blob[4:]
    assert len(sig) == 3309
    assert ML_DSA_65.verify(ml_v.public_key, text.encode(), sig, ctx=b"")
    mldsa.MLDSA65PublicKey.from_public_bytes(ml_v.public_key).verify(sig, text.encode())
    vkey = ml_v.vkey()
    assert vkey.startswith(f"{s.origin}+{blob[:4].hex()}+")
    assert base64.b64decode(vkey.split("+", 2)[2]) == b"\xffML-DSA-65" + ml_v.public_key
    assert Verifier.from_vkey(vkey) == ml_v
    assert parse_checkpoint(open_note(note, s.verifiers, require_all=True).text).size == 42


def test_a_bad_known_signature_fails_the_note_and_unknown_keys_are_ignored() -> None:
    s, other = TestSigner(), TestSigner()
    note = s.note(1, bytes(32))
    with pytest.raises(NoteError):
        open_note(note, other.verifiers)
    head, sigs = note.split("\n\n")
    ml_line, ed_line = sigs.splitlines()
    bad_ml = ml_line[:-8] + ("AAAAAAA=" if not ml_line.endswith("AAAAAAA=") else "BBBBBBB=")
    with pytest.raises(NoteError):
        open_note(f"{head}\n\n{bad_ml}\n{ed_line}\n", s.verifiers)
    assert open_note(f"{head}\n\n{ed_line}\n", s.verifiers).signatures[0].key_id == s.verifiers[1].key_id
    with pytest.raises(NoteError):
        open_note(f"{head}\n\n{ed_line}\n", s.verifiers, require_all=True)


@pytest.mark.parametrize(
    "bad",
    ["no blank line\n\u2014 a AAAAAAA=\n", "text\n\n", "text\n\n\u2014 a AAAA\n", "text\n\n- a AAAAAAAA\n",
     "te\x01xt\n\n\u2014 a AAAAAAAA\n", "text\n\n\u2014 a AAAAAAAA"],
)
def test_malformed_notes_are_refused(bad: str) -> None:
    with pytest.raises(NoteError):
        parse_note(bad)


def test_checkpoint_bodies() -> None:
    root = bytes(range(32))
    text = format_checkpoint("example.com/log", 7, root, ["ext one"])
    assert parse_checkpoint(text).extensions == ("ext one",)
    for bad in ("o\n07\n" + base64.b64encode(root).decode() + "\n", "o\n7\nAAAA\n", "o\n7\n", "\n7\nAA==\n"):
        with pytest.raises(NoteError):
            parse_checkpoint(bad)
    assert key_id("a", ED25519_TYPE, b"k") != key_id("a", MLDSA65_TYPE, b"k")
